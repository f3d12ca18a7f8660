#![allow(dead_code)]
mod package;
fn main() {}
