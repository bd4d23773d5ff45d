//! `ember`: the command line. `ember run` boots a VM (in the foreground, or in the background
//! with `-d`); the virsh-style verbs talk to running VMs through their API sockets and manage
//! definitions; `ember img` and `ember net` are the qemu-img and virsh net-* tools.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ember::cli::{
    self, balloon, clone, defs, hotplug, jail, migrate, run, snapshots, vcpus, verbs,
};

#[derive(Parser)]
#[command(name = "ember", version, about = "A small hypervisor on Linux KVM", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest kernel (like qemu-system-x86_64 -M microvm -kernel ..., or firecracker)
    Run(Box<run::RunArgs>),
    /// List VMs (running ones; with --all also defined ones that are shut off)
    List(verbs::ListArgs),
    /// Start a defined VM in the background
    Start(defs::StartArgs),
    /// Ask a VM's guest to power off (ACPI power button or Ctrl-Alt-Del)
    Shutdown(verbs::ShutdownArgs),
    /// Ask a VM's guest to power off, then boot it again
    Reboot(verbs::RebootArgs),
    /// Reset a VM at once (as the reset button)
    Reset(verbs::NameArg),
    /// End a VM at once (as pulling the plug)
    Destroy(verbs::NameArg),
    /// Pause a VM's vCPUs
    Suspend(verbs::NameArg),
    /// Let a paused VM run again
    Resume(verbs::NameArg),
    /// Attach to a VM's serial console (Ctrl-] detaches)
    Console(verbs::ConsoleArgs),
    /// Show a VM's state, CPUs, memory and devices
    Dominfo(verbs::NameArg),
    /// List a VM's disks
    Domblklist(verbs::NameArg),
    /// List a VM's network interfaces
    Domiflist(verbs::NameArg),
    /// Show a VM's vCPUs
    Vcpuinfo(verbs::NameArg),
    /// Plug vCPUs into a running VM or take some out (ACPI CPU hotplug, up to --cpus max)
    Setvcpus(vcpus::SetvcpusArgs),
    /// Show a VM's counters (vCPU exits, disk and NIC I/O)
    Domstats(verbs::NameArg),
    /// Set how much memory a VM's guest keeps (its balloon's target), up to its maximum
    Setmem(balloon::SetmemArgs),
    /// Set a VM's maximum memory in its definition (a running VM's is fixed)
    Setmaxmem(balloon::SetmaxmemArgs),
    /// Show a VM's memory statistics (balloon, guest figures, host RSS) in KiB
    Dommemstat(balloon::DommemstatArgs),
    /// Attach a disk image to a running VM (PCI hotplug)
    #[command(name = "attach-disk")]
    AttachDisk(hotplug::AttachDiskArgs),
    /// Detach a disk from a running VM once its guest released it
    #[command(name = "detach-disk")]
    DetachDisk(hotplug::DetachDiskArgs),
    /// Attach a network interface to a running VM (PCI hotplug)
    #[command(name = "attach-interface")]
    AttachInterface(hotplug::AttachIfaceArgs),
    /// Detach a network interface from a running VM once its guest released it
    #[command(name = "detach-interface")]
    DetachInterface(hotplug::DetachIfaceArgs),
    /// Save a running VM to a file and stop it (memory goes to FILE.mem)
    Save(verbs::SaveArgs),
    /// Start a VM from a file 'ember save' wrote, in the background
    Restore(verbs::RestoreArgs),
    /// Take a named snapshot (memory, devices and qcow2 disks, or --disk-only overlays)
    #[command(name = "snapshot-create-as")]
    SnapshotCreateAs(snapshots::CreateArgs),
    /// List a VM's snapshots
    #[command(name = "snapshot-list")]
    SnapshotList(snapshots::ListArgs),
    /// Show a snapshot
    #[command(name = "snapshot-info")]
    SnapshotInfo(snapshots::SnapArgs),
    /// Bring a VM back as a snapshot was (memory and disks)
    #[command(name = "snapshot-revert")]
    SnapshotRevert(snapshots::SnapArgs),
    /// Delete a snapshot
    #[command(name = "snapshot-delete")]
    SnapshotDelete(snapshots::SnapArgs),
    /// Merge a Diff snapshot's memory file onto its base (Firecracker's rebase-snap)
    #[command(name = "snapshot-rebase")]
    SnapshotRebase(snapshots::RebaseArgs),
    /// Move a running VM to an 'ember run --incoming' on this or another host
    Migrate(migrate::MigrateArgs),
    /// Show a VM's migration job (progress, or how the last one ended)
    Domjobinfo(verbs::NameArg),
    /// Cancel a VM's migration (the VM goes on here)
    Domjobabort(verbs::NameArg),
    /// Copy a defined VM: new name, MACs and disks (like virt-clone)
    Clone(clone::CloneArgs),
    /// Store a VM definition (a TOML file) under its name
    Define(defs::DefineArgs),
    /// Remove a VM's definition
    Undefine(verbs::NameArg),
    /// Print a VM's definition (or a running VM's configuration)
    Dumpconfig(verbs::NameArg),
    /// Edit a VM's definition in $EDITOR (checked before it is saved)
    Edit(verbs::NameArg),
    /// Start a defined VM when `ember start --autostart` runs (at boot)
    Autostart(defs::AutostartArgs),
    /// Run boot tests from TOML files: shared boots, snapshot reset per case, JUnit/JSON
    Test(Box<ember::cli::test::TestArgs>),
    /// Create, inspect, convert and check disk images (like qemu-img)
    Img(ember::img::ImgArgs),
    /// Create, list and destroy host networks: bridges, NAT, DHCP (like virsh net-*)
    Net(ember::net::NetArgs),
    /// Run a VM confined: namespaces, a chroot of its files, an unprivileged user, cgroups
    Jail(Box<jail::JailArgs>),
}

fn main() -> ExitCode {
    ember::logger::init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return cli::usage_error(e),
    };
    match cli.command {
        Command::Run(args) => run::run(*args),
        Command::List(a) => verbs::list(a),
        Command::Start(a) => defs::start(a),
        Command::Shutdown(a) => verbs::shutdown(a),
        Command::Reboot(a) => verbs::reboot(a),
        Command::Reset(a) => verbs::reset(a),
        Command::Destroy(a) => verbs::destroy(a),
        Command::Suspend(a) => verbs::suspend(a),
        Command::Resume(a) => verbs::resume(a),
        Command::Console(a) => verbs::console(a),
        Command::Dominfo(a) => verbs::dominfo(a),
        Command::Domblklist(a) => verbs::domblklist(a),
        Command::Domiflist(a) => verbs::domiflist(a),
        Command::Vcpuinfo(a) => verbs::vcpuinfo(a),
        Command::Setvcpus(a) => vcpus::setvcpus(a),
        Command::Domstats(a) => verbs::domstats(a),
        Command::Setmem(a) => balloon::setmem(a),
        Command::Setmaxmem(a) => balloon::setmaxmem(a),
        Command::Dommemstat(a) => balloon::dommemstat(a),
        Command::AttachDisk(a) => hotplug::attach_disk(a),
        Command::DetachDisk(a) => hotplug::detach_disk(a),
        Command::AttachInterface(a) => hotplug::attach_interface(a),
        Command::DetachInterface(a) => hotplug::detach_interface(a),
        Command::Save(a) => verbs::save(a),
        Command::Restore(a) => verbs::restore(a),
        Command::SnapshotCreateAs(a) => snapshots::create(a),
        Command::SnapshotList(a) => snapshots::list(a),
        Command::SnapshotInfo(a) => snapshots::info(a),
        Command::SnapshotRevert(a) => snapshots::revert(a),
        Command::SnapshotDelete(a) => snapshots::delete(a),
        Command::SnapshotRebase(a) => snapshots::rebase(a),
        Command::Migrate(a) => migrate::migrate(a),
        Command::Domjobinfo(a) => migrate::domjobinfo(a),
        Command::Domjobabort(a) => migrate::domjobabort(a),
        Command::Clone(a) => clone::run(a),
        Command::Define(a) => defs::define(a),
        Command::Undefine(a) => defs::undefine(a),
        Command::Dumpconfig(a) => defs::dumpconfig(a),
        Command::Edit(a) => defs::edit(a),
        Command::Autostart(a) => defs::autostart(a),
        Command::Test(args) => ember::cli::test::test(*args),
        Command::Img(args) => ember::img::run(args),
        Command::Net(args) => ember::net::run_command(args),
        Command::Jail(args) => jail::run(*args),
    }
}
