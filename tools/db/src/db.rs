//! The one operation, `read`: rows of an allow-listed table, optionally
//! those with a column containing `filter`. The table name is checked
//! against the allow-list and against the database's own tables before it
//! is quoted into SQL; `filter` is only ever a bound parameter.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde_json::{Map, Value, json};

/// Longest filter accepted.
const MAX_FILTER: usize = 1024;

#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
    tables: Vec<String>,
    max_rows: usize,
}

/// A refusal or failure, told to the agent as a tool error.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadError(pub String);

impl Db {
    /// Opens `path` read-only (it must exist).
    pub fn open(path: &Path, tables: Vec<String>, max_rows: usize) -> Result<Db, String> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| e.to_string())?;
        Ok(Db {
            conn: Mutex::new(conn),
            tables,
            max_rows,
        })
    }

    /// The MCP description of `read`.
    pub fn tool(&self) -> Value {
        json!({
            "name": "read",
            "title": "Read rows",
            "description": format!(
                "Rows of one table (at most {}), optionally only those where some column contains `filter`.",
                self.max_rows
            ),
            "inputSchema": {
                "type": "object",
                "properties": {
                    "table": {"type": "string", "enum": self.tables, "description": "The table to read."},
                    "filter": {"type": "string", "description": "Only rows where some column's text contains this (case-sensitive)."},
                },
                "required": ["table"],
                "additionalProperties": false,
            },
            "annotations": {"readOnlyHint": true, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false},
        })
    }

    /// Runs `read` with the call's arguments.
    pub fn read(&self, args: &Map<String, Value>) -> Result<Value, ReadError> {
        for k in args.keys() {
            if k != "table" && k != "filter" {
                return Err(ReadError(format!(
                    "unknown argument `{k}` (read takes table and filter)"
                )));
            }
        }
        let table = match args.get("table") {
            Some(Value::String(t)) => t,
            Some(_) => return Err(ReadError("`table` must be a string".into())),
            None => return Err(ReadError("`table` is required".into())),
        };
        // The tool's own check, whatever the broker decided.
        if !self.tables.iter().any(|t| t == table) {
            return Err(ReadError(format!(
                "table `{table}` is not readable through this tool"
            )));
        }
        let filter = match args.get("filter") {
            None | Some(Value::Null) => None,
            Some(Value::String(f)) if f.len() <= MAX_FILTER => Some(f.as_str()),
            Some(Value::String(_)) => {
                return Err(ReadError(format!(
                    "`filter` is longer than {MAX_FILTER} bytes"
                )));
            }
            Some(_) => return Err(ReadError("`filter` must be a string".into())),
        };
        let conn = self
            .conn
            .lock()
            .map_err(|_| ReadError("database unavailable".into()))?;
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")
            .and_then(|mut s| {
                s.query_map([table], |r| r.get::<_, String>(0))?
                    .collect::<Result<_, _>>()
            })
            .map_err(|e| ReadError(e.to_string()))?;
        if columns.is_empty() {
            return Err(ReadError(format!("no table `{table}` in the database")));
        }
        let mut sql = format!("SELECT * FROM {}", quote(table));
        if filter.is_some() {
            let any: Vec<String> = columns
                .iter()
                .map(|c| format!("instr(CAST({} AS TEXT), ?1) > 0", quote(c)))
                .collect();
            sql.push_str(" WHERE ");
            sql.push_str(&any.join(" OR "));
        }
        sql.push_str(&format!(" LIMIT {}", self.max_rows + 1));
        let mut stmt = conn.prepare(&sql).map_err(|e| ReadError(e.to_string()))?;
        let to_row = |r: &rusqlite::Row<'_>| {
            let mut row = Map::new();
            for (i, c) in columns.iter().enumerate() {
                row.insert(c.clone(), cell(r.get_ref(i)?));
            }
            Ok(Value::Object(row))
        };
        let mut rows: Vec<Value> = match filter {
            Some(f) => stmt.query_map([f], to_row),
            None => stmt.query_map([], to_row),
        }
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| ReadError(e.to_string()))?;
        let truncated = rows.len() > self.max_rows;
        rows.truncate(self.max_rows);
        Ok(json!({"table": table, "columns": columns, "rows": rows, "truncated": truncated}))
    }
}

/// An SQL identifier, quoted. Only names from the allow-list and the
/// database's own schema reach here.
fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn cell(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => json!(i),
        ValueRef::Real(f) => json!(f),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            Value::String(format!("x'{hex}'"))
        }
    }
}

/// Creates the demo database (`users`, `orders`, and a `secrets` table no
/// allow-list should name) unless `path` exists.
pub fn init_demo(path: &Path) -> Result<bool, String> {
    if path.exists() {
        return Ok(false);
    }
    let conn = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    conn.execute_batch(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL);
         INSERT INTO users VALUES (1, 'Ada Lovelace', 'ada@example.com'),
                                  (2, 'Alan Turing', 'alan@example.com'),
                                  (3, 'Grace Hopper', 'grace@example.com');
         CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, item TEXT NOT NULL, total REAL NOT NULL);
         INSERT INTO orders VALUES (1, 1, 'analytical engine', 1843.0),
                                   (2, 2, 'bombe', 1939.5),
                                   (3, 3, 'compiler', 1952.25);
         CREATE TABLE secrets (id INTEGER PRIMARY KEY, note TEXT NOT NULL);
         INSERT INTO secrets VALUES (1, 'the launch code is 0000');",
    )
    .map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn db(tables: &[&str]) -> (Db, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "lever-tool-db-unit-{}-{}",
            std::process::id(),
            tables.join("-")
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("demo.db");
        init_demo(&path).unwrap();
        let db = Db::open(&path, tables.iter().map(|s| s.to_string()).collect(), 2).unwrap();
        (db, dir)
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn reads_an_allowed_table_and_filters_by_parameter() {
        let (db, dir) = db(&["users", "orders"]);
        let r = db.read(&args(json!({"table": "users"}))).unwrap();
        assert_eq!(r["rows"].as_array().unwrap().len(), 2);
        assert_eq!(r["truncated"], true);
        let r = db
            .read(&args(json!({"table": "users", "filter": "Grace"})))
            .unwrap();
        assert_eq!(r["rows"][0]["email"], "grace@example.com");
        // SQL in a filter is just text to look for.
        let r = db
            .read(&args(json!({"table": "users", "filter": "' OR 1=1 --"})))
            .unwrap();
        assert_eq!(r["rows"].as_array().unwrap().len(), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn refuses_tables_outside_its_own_allow_list() {
        let (db, dir) = db(&["users"]);
        for t in [
            "secrets",
            "orders",
            "users; DROP TABLE users",
            "\"users\"",
            "USERS",
            "sqlite_master",
        ] {
            let e = db.read(&args(json!({"table": t}))).unwrap_err();
            assert!(e.0.contains("not readable"), "{t}: {e:?}");
        }
        assert!(db.read(&args(json!({"table": ["users"]}))).is_err());
        assert!(db.read(&args(json!({"filter": "x"}))).is_err());
        assert!(
            db.read(&args(json!({"table": "users", "limit": 5})))
                .is_err()
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_allowed_name_missing_from_the_database_is_an_error() {
        let (db, dir) = db(&["users", "nope"]);
        let e = db.read(&args(json!({"table": "nope"}))).unwrap_err();
        assert!(e.0.contains("no table"), "{e:?}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
