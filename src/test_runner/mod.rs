//! Pieces of `ember test`, the boot-test runner: reading the test results a guest prints
//! ([`ktap`]) and writing what CI systems read ([`report`]: JUnit XML and JSON).

pub mod ktap;
pub mod report;
