#!/usr/bin/env node
// Validate KQL queries with Microsoft's Kusto language service (@kusto/language-service-next).
//
// stdin:  JSON array of query strings.
// stdout: JSON array, one entry per query: a list of its Error-severity diagnostics,
//         each {"severity", "code", "message", "start", "length"} (start/length are
//         character offsets into the query). Warnings/suggestions are dropped here.
// Exit 0 whenever analysis ran (even with diagnostics); non-zero on harness failure
// (bad input, bad schema, package missing), with the reason on stderr.
//
// Every table in app_tables.json (except "_source") is a member of the default
// database, so unqualified names like `AppRequests` resolve as in Log Analytics.
"use strict";

const fs = require("fs");
const path = require("path");

// bridge.js installs the global `Bridge`/`System` runtime that the compiled
// Kusto.Language.Bridge.js (the package "main") needs; it defines global `Kusto`.
require("@kusto/language-service-next/bridge.js");
require("@kusto/language-service-next");
const K = global.Kusto.Language;
const S = K.Symbols;

function buildGlobals(schemaPath) {
  const schema = JSON.parse(fs.readFileSync(schemaPath, "utf8"));
  const tables = Object.entries(schema)
    .filter(([name]) => name !== "_source")
    .map(([tableName, columns]) => {
      const cols = Object.entries(columns).map(([colName, typeName]) => {
        const type = S.ScalarTypes.GetSymbol(typeName);
        if (!type) throw new Error(`unknown Kusto type '${typeName}' for ${tableName}.${colName}`);
        return new S.ColumnSymbol(colName, type);
      });
      return new S.TableSymbol.$ctor4(tableName, cols);
    });
  const db = new S.DatabaseSymbol.ctor("workspace", tables);
  return K.GlobalState.Default.WithDatabase(db);
}

function errorsFor(query, globals) {
  const code = K.KustoCode.ParseAndAnalyze(query, globals);
  const list = code.GetDiagnostics();
  const out = [];
  for (let i = 0, n = System.Array.getCount(list, K.Diagnostic); i < n; i++) {
    const d = System.Array.getItem(list, i, K.Diagnostic);
    if (d.Severity !== K.DiagnosticSeverity.Error) continue;
    out.push({ severity: d.Severity, code: d.Code, message: d.Message, start: d.Start, length: d.Length });
  }
  return out;
}

function main() {
  const queries = JSON.parse(fs.readFileSync(0, "utf8"));
  if (!Array.isArray(queries) || !queries.every((q) => typeof q === "string")) {
    throw new Error("stdin must be a JSON array of strings");
  }
  const globals = buildGlobals(path.join(__dirname, "app_tables.json"));
  process.stdout.write(JSON.stringify(queries.map((q) => errorsFor(q, globals))) + "\n");
}

try {
  main();
} catch (err) {
  process.stderr.write(`validate.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(2);
}
