//! `lever-tool-db` as a library: the database access and the MCP server,
//! so benches can run the very same tool in-process.

pub mod db;
pub mod server;
