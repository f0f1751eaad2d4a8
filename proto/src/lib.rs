//! Generated gRPC types and services of the Isthmus control plane
//! (`proto/isthmus/v1/isthmus.proto`).
#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("isthmus.v1");
}

pub use v1::*;
