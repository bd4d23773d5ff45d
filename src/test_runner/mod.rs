//! `ember test`, the boot-test runner: test files ([`testfile`]) laid out into a run
//! ([`plan`]), shared boots frozen at their ready point and every case started from there
//! or booted on its own ([`runner`], one child `ember run` per VM: [`vm`]), the guest's
//! console read as it comes ([`watch`], the guest kit's [`channel`]), the results a guest
//! prints in KTAP ([`ktap`]), and what CI systems read ([`report`]: JUnit XML and JSON).

pub mod channel;
pub mod disks;
pub mod ktap;
pub mod plan;
pub mod progress;
pub mod report;
pub mod runner;
pub mod testfile;
pub mod verdict;
pub mod vm;
pub mod watch;
