//! Pieces of `ember test`, the boot-test runner: reading the test results a guest prints
//! ([`ktap`]).

pub mod ktap;
