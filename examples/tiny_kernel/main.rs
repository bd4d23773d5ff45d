//! Builds the tiny test kernel and, optionally, boots it under ember.
//!
//! ```text
//! cargo run --example tiny_kernel -- write tiny.elf      # just write the ELF
//! cargo build && cargo run --example tiny_kernel -- run exit=16   # boot it, show the status
//! cargo run --example tiny_kernel -- run count=20 dirty=64   # 20 ticks, 64 KiB stored each
//! ```
//!
//! A CI system boot-tests a kernel the same way: the guest reports through the debug-exit
//! port and ember's exit status is `(value << 1) | 1`:
//!
//! ```text
//! ember run --kernel tiny.elf --cmdline "exit=16" --serial none; echo $?   # 33
//! ```

mod guest;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") if args.len() == 2 => match std::fs::write(&args[1], guest::elf_image()) {
            Ok(()) => {
                println!("wrote {} ({} bytes of code)", args[1], guest::code().len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot write {}: {e}", args[1]);
                ExitCode::from(2)
            }
        },
        Some("write-pvh") if args.len() == 2 => {
            match std::fs::write(&args[1], guest::pvh_elf_image()) {
                Ok(()) => {
                    println!("wrote {} (with a PVH entry note)", args[1]);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cannot write {}: {e}", args[1]);
                    ExitCode::from(2)
                }
            }
        }
        Some("run") => run(&args[1..].join(" ")),
        _ => {
            eprintln!("usage: tiny_kernel write FILE | tiny_kernel write-pvh FILE | tiny_kernel run [CMDLINE WORDS...]");
            ExitCode::from(2)
        }
    }
}

/// Writes the kernel next to the ember binary of this build and boots it.
fn run(cmdline: &str) -> ExitCode {
    let exe = std::env::current_exe().expect("own path");
    let target_dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let ember = target_dir.join("ember");
    let kernel = target_dir.join("tiny.elf");
    if let Err(e) = std::fs::write(&kernel, guest::elf_image()) {
        eprintln!("cannot write {}: {e}", kernel.display());
        return ExitCode::from(2);
    }
    let status = Command::new(&ember)
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", "16M", "--cmdline", cmdline])
        .status();
    match status {
        Ok(s) => {
            println!("ember exited with {s}");
            ExitCode::from(s.code().unwrap_or(1) as u8)
        }
        Err(e) => {
            eprintln!(
                "cannot start {} (run `cargo build` first): {e}",
                ember.display()
            );
            ExitCode::from(2)
        }
    }
}
