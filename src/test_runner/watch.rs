//! Reading a guest's serial output as it arrives: lines matched against a case's `expect`
//! (in order) and `fail_on` patterns, the guest kit channel's lines, KTAP results, and the
//! bounded on-disk log. Everything here comes from the guest: memory stays bounded whatever
//! it prints (a line past [`MAX_LINE`] bytes is cut, the log file stops at its limit, the
//! KTAP parser has its own limits).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use regex::Regex;

use super::channel;
use super::ktap::{KtapParser, KtapReport};

/// Bytes of one line that are matched; the rest of a longer line is not looked at.
pub const MAX_LINE: usize = 64 * 1024;

/// Kernel trouble that fails every case unless it says `default_fail_on = false`: a panic,
/// a BUG, an oops or other `die()` report (`Oops: 0002 [#1]`, `general protection fault,
/// ...: 0000 [#1]`), a WARN.
pub const DEFAULT_FAIL_ON: [&str; 4] = [
    r"Kernel panic - not syncing",
    r"\bBUG: ",
    r": [0-9a-f]{4} \[#[0-9]+\]",
    r"WARNING: CPU: [0-9]+ PID: [0-9]+ at ",
];

/// The default patterns, compiled.
pub fn default_fail_on() -> Vec<Regex> {
    DEFAULT_FAIL_ON
        .iter()
        .filter_map(|p| Regex::new(p).ok())
        .collect()
}

/// What a watcher looks for.
#[derive(Debug, Default, Clone)]
pub struct WatchSpec {
    /// Patterns that must appear in this order.
    pub expect: Vec<Regex>,
    /// Patterns that end the run as failed.
    pub fail_on: Vec<Regex>,
    /// A pattern whose first match sets [`Watcher::ready`].
    pub ready: Option<Regex>,
    /// Read the guest kit channel's start and result lines.
    pub channel: bool,
    /// Parse KTAP/TAP.
    pub ktap: bool,
}

/// The state of one guest's output.
#[derive(Debug)]
pub struct Watcher {
    spec: WatchSpec,
    line: Vec<u8>,
    next_expect: usize,
    ktap: Option<KtapParser>,
    /// The ready pattern was seen.
    pub ready: bool,
    /// The channel's start line was seen.
    pub started: bool,
    /// The channel's result: the command's exit status.
    pub result: Option<i32>,
    /// A `fail_on` pattern matched: the pattern and the line.
    pub trouble: Option<(String, String)>,
    /// Lines seen.
    pub lines: u64,
    /// The last line seen (cut to 200 characters).
    pub last_line: String,
}

impl Watcher {
    /// A watcher for `spec`.
    pub fn new(spec: WatchSpec) -> Self {
        let ktap = spec.ktap.then(KtapParser::new);
        Watcher {
            spec,
            line: Vec::new(),
            next_expect: 0,
            ktap,
            ready: false,
            started: false,
            result: None,
            trouble: None,
            lines: 0,
            last_line: String::new(),
        }
    }

    /// True once nothing more is read: the command reported, or trouble was seen.
    pub fn closed(&self) -> bool {
        self.result.is_some() || self.trouble.is_some()
    }

    /// Reads a chunk of output; lines may be split anywhere.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.closed() {
            return;
        }
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            if let Some(k) = &mut self.ktap {
                k.feed(&rest[..=nl]);
            }
            self.push(&rest[..nl]);
            self.end_line();
            if self.closed() {
                return;
            }
            rest = &rest[nl + 1..];
        }
        if let Some(k) = &mut self.ktap {
            k.feed(rest);
        }
        self.push(rest);
    }

    /// The output ended: a last unterminated line is read too.
    pub fn finish(&mut self) {
        if !self.line.is_empty() && !self.closed() {
            self.end_line();
        }
    }

    /// The expect patterns not seen yet (the first one is what is missing).
    pub fn missing_expect(&self) -> Option<(usize, &Regex)> {
        self.spec
            .expect
            .get(self.next_expect)
            .map(|r| (self.next_expect, r))
    }

    /// The KTAP results, if KTAP was parsed and any was found.
    pub fn take_ktap(&mut self) -> Option<KtapReport> {
        let report = self.ktap.take()?.finish();
        report.root.is_some().then_some(report)
    }

    fn push(&mut self, part: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn end_line(&mut self) {
        let raw = std::mem::take(&mut self.line);
        let text = String::from_utf8_lossy(&raw);
        let line = text.trim_end_matches(['\r', '\n']);
        self.lines += 1;
        self.last_line = line.chars().take(200).collect();
        self.check_line(line);
        // Keep the allocation for the next line, unless a long line grew it.
        if raw.capacity() <= 4096 {
            self.line = raw;
            self.line.clear();
        }
    }

    fn check_line(&mut self, line: &str) {
        if let Some(re) = self.spec.fail_on.iter().find(|re| re.is_match(line)) {
            self.trouble = Some((re.as_str().to_string(), line.chars().take(500).collect()));
            return;
        }
        let mut pos = 0;
        while let Some(re) = self.spec.expect.get(self.next_expect) {
            match re.find_at(line, pos) {
                Some(m) => {
                    self.next_expect += 1;
                    pos = m.end();
                }
                None => break,
            }
        }
        if !self.ready && self.spec.ready.as_ref().is_some_and(|r| r.is_match(line)) {
            self.ready = true;
        }
        if self.spec.channel {
            if line == channel::START_LINE {
                self.started = true;
            } else if let Some(code) = channel::parse_exit(line) {
                self.result = Some(code);
            }
        }
    }
}

/// A case's serial log on disk, cut at a size limit. Written as the output arrives (a chunk
/// per pipe read, no buffering here), so `tail -f` shows a running case.
#[derive(Debug)]
pub struct LogFile {
    out: File,
    written: u64,
    limit: u64,
    /// Bytes not written (over the limit).
    pub dropped: u64,
}

impl LogFile {
    /// Creates (truncates) the log at `path`.
    pub fn create(path: &Path, limit: u64) -> io::Result<Self> {
        Ok(LogFile {
            out: File::create(path)?,
            written: 0,
            limit,
            dropped: 0,
        })
    }

    /// Appends what fits under the limit.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let room = self.limit.saturating_sub(self.written);
        let n = (bytes.len() as u64).min(room) as usize;
        self.out.write_all(&bytes[..n])?;
        self.written += n as u64;
        self.dropped += (bytes.len() - n) as u64;
        Ok(())
    }

    /// Flushes, noting how much was dropped.
    pub fn finish(mut self) -> io::Result<()> {
        if self.dropped > 0 {
            writeln!(
                self.out,
                "\n[ember test: {} more bytes of console output not logged: the log stops at {} bytes]",
                self.dropped, self.limit
            )?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests;
