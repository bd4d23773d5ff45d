//! Legacy PC devices on the PIO bus.

pub mod acpi_pm;
pub mod cmos;
pub mod cpu_hotplug;
pub mod debug_exit;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

pub use acpi_pm::AcpiPm;
pub use cmos::Cmos;
pub use cpu_hotplug::CpuHotplug;
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::SerialDevice;
