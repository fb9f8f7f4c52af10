//! The Workload API's messages and service, generated from
//! `proto/workload.proto` by `build.rs`.
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));
