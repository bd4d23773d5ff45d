//! How a case's command reaches the guest kit's init and how its exit status comes back:
//! the serial console.
//!
//! With `ember.test=serial` on the kernel command line, `tests/guest/rootfs/init` turns off
//! the console's echo, prints [`READY_LINE`] and waits for an empty line; it prints
//! [`START_LINE`] and sources the console up to end-of-file (Ctrl-D at the start of a line),
//! so the command runs in init's own shell, read a line per system call (the `read` builtin
//! takes one per byte, and each costs milliseconds where guest kernel code is emulated),
//! without a fork (seconds there); the VM is thrown away after the case, so nothing leaks
//! into another case. Then it prints `ember-test: exit=N` and powers off. A shared boot's
//! snapshot is taken at the ready line, so every case that starts from it finds init waiting.

/// What `ember test` adds to the kernel command line of a boot whose cases run commands.
pub const CMDLINE_WORD: &str = "ember.test=serial";
/// Init is waiting for a command.
pub const READY_LINE: &str = "ember-test: ready";
/// Init read the command and runs it now.
pub const START_LINE: &str = "ember-test: start";
/// What ends the command: end-of-file on a canonical-mode tty (Ctrl-D at a line's start).
pub const END: u8 = 0x04;
/// The start of the line with the command's exit status.
pub const EXIT_PREFIX: &str = "ember-test: exit=";

/// The bytes to write on the console for `command`: the empty line that says go, the
/// command's lines, end-of-file.
pub fn encode(command: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + 3);
    out.push(b'\n');
    for line in command.lines() {
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(END);
    out
}

/// The exit status on a result line (`ember-test: exit=N`, N from 0 to 255).
pub fn parse_exit(line: &str) -> Option<i32> {
    let n = line.trim_end().strip_prefix(EXIT_PREFIX)?;
    let n: i32 = n.parse().ok()?;
    (0..=255).contains(&n).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_multi_line_command_is_sent_after_an_empty_line_and_ended_by_eof() {
        // Arrange
        let cmd = "echo a\nif true; then\n  echo b\nfi";

        // Act
        let bytes = encode(cmd);

        // Assert
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "\necho a\nif true; then\n  echo b\nfi\n\x04"
        );
    }

    #[test]
    fn only_a_well_formed_result_line_gives_a_status() {
        assert_eq!(parse_exit("ember-test: exit=0"), Some(0));
        assert_eq!(parse_exit("ember-test: exit=127\r"), Some(127));
        assert_eq!(parse_exit("ember-test: exit=256"), None);
        assert_eq!(parse_exit("ember-test: exit=-1"), None);
        assert_eq!(parse_exit("ember-test: exit="), None);
        assert_eq!(parse_exit("xember-test: exit=0"), None);
    }
}
