#![allow(dead_code)]
mod config;
mod package;
mod paths;
mod secrets;
fn main() {}
