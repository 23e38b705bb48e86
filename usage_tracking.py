"""Server-side audit events: logins and create/read/update/delete activity."""
from logging_utils import MAX_KEY, MAX_VALUE, record_event

CRUD_ACTIONS = ("create", "read", "update", "delete")
MAX_USER_ID = 256


def _require_text(name, value, limit):
    """Return value stripped, or raise ValueError naming the argument."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    value = value.strip()
    if len(value) > limit:
        raise ValueError(f"{name} must be at most {limit} characters")
    return value


def _user_id(value):
    """A user id as text: a non-empty string, or an int as its decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError("user_id must be a non-empty string or an integer")
    return _require_text("user_id", value, MAX_USER_ID)


def log_user_login(user_id):
    """Record a UserLogin event for an authenticated user; returns its event_id (None if not recorded)."""
    user_id = _user_id(user_id)
    return record_event("UserLogin", {"user_id": user_id}, user_id=user_id, strict=False)


def log_crud_activity(action, user_id, entity):
    """Record a CrudActivity event (create, read, update or delete, any case); returns its event_id."""
    if not isinstance(action, str) or action.strip().lower() not in CRUD_ACTIONS:
        raise ValueError(f"action must be one of {', '.join(CRUD_ACTIONS)}")
    user_id = _user_id(user_id)
    entity = _require_text("entity", entity, min(MAX_KEY, MAX_VALUE))
    return record_event("CrudActivity",
                        {"action": action.strip().lower(), "entity": entity, "user_id": user_id},
                        user_id=user_id, strict=False)
