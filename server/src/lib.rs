//! The Tollgate reference server: a small multi-tenant axum API wired with
//! Tollgate's layers, configured from the environment.
//!
//! # How it is put together
//!
//! - [`config`]: every environment variable, its default, format and
//!   meaning, written once ([`config::VARIABLES`]); parsed at start-up.
//! - [`routes`]: each route declared once — handler, method, path and
//!   documentation (`#[utoipa::path]`) and its [`Class`](limits::Class)
//!   (probe, admin, public, login, read, write).
//! - [`limits`]: [`Limits`](limits::Limits), built once, owns the
//!   rate-limit store (memory or Redis), the shared local fallback, the
//!   trust table and the store's health, and turns a class into its
//!   layers.
//! - [`trust`]: trust levels: the table, each request's current level
//!   (put in request extensions), and the one function that changes one.
//! - [`app()`]: builds the router and `/openapi.json` from the
//!   declarations, adds each class's layers, and wraps it all in the
//!   request-wide layers.
//! - [`Server`]: binds, prepares the database, starts background tasks,
//!   serves until its [`ShutdownHandle`] fires; `main.rs` adds signals.
//!
//! Dependencies go one way: `routes` → `limits`, `trust`, `auth`, `error`,
//! `openapi`, `state`; `app` → `routes`; `server` → `app`. Nothing in
//! `tollgate` (the library) knows this crate.

pub mod access_log;
mod app;
pub mod auth;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod limits;
pub mod openapi;
pub mod plans;
pub mod routes;
pub mod serve;
mod server;
pub mod shared_cache;
pub mod state;
pub mod step;
pub mod trust;

pub use app::{BODY_LIMIT, app};
pub use server::{Server, ShutdownHandle, ShutdownSignals, prepare_database};
pub use state::{AppState, AppStateInner, StartError};
