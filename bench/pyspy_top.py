"""Summarise py-spy's raw (collapsed) output: the top functions by own time and by total time.

    py-spy record --format raw -o prof.txt [--threads] -- python ...
    python bench/pyspy_top.py prof.txt [--top 25]
"""
import argparse
import collections
import re

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _name(frame):
    """`func (path:line)` -> `func (file.py)`; thread markers and idle frames stay as they are."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('func')} ({m.group('file').rsplit('/', 1)[-1]})"


def summarise(path, top=25, focus=None):
    """Return (total samples, [(own, total, name)] by own time, [(total, name)] by total time).

    focus: only stacks with a frame containing one of these strings (e.g. leave start-up out).
    """
    own, incl = collections.Counter(), collections.Counter()
    total = 0
    with open(path) as fh:
        for line in fh:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = [_name(f) for f in stack.split(";") if f]
            if not frames or (focus and not any(x in f for f in frames for x in focus)):
                continue
            own[frames[-1]] += n
            for name in set(frames):
                incl[name] += n
    rows = [(own[name], incl[name], name) for name in own]
    rows.sort(reverse=True)
    by_total = sorted(((incl[n], n) for n in incl), reverse=True)
    return total, rows[:top], by_total[:top]


def format_table(path, top=25):
    """Markdown tables of the top entries."""
    total, by_own, by_total = summarise(path, top)
    out = [f"samples: {total}", "", "| own % | total % | function |", "| ---: | ---: | --- |"]
    for o, i, name in by_own:
        out.append(f"| {100.0 * o / total:.1f} | {100.0 * i / total:.1f} | `{name}` |")
    out += ["", "| total % | function (inclusive) |", "| ---: | --- |"]
    for i, name in by_total:
        out.append(f"| {100.0 * i / total:.1f} | `{name}` |")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(format_table(args.path, args.top))
