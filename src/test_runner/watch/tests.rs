use super::*;

fn re(s: &str) -> Regex {
    Regex::new(s).unwrap()
}

#[test]
fn expect_patterns_match_in_order_across_chunks_and_within_a_line() {
    // Arrange
    let mut w = Watcher::new(WatchSpec {
        expect: vec![re("a+"), re("b"), re("c"), re("d")],
        ..WatchSpec::default()
    });

    // Act: "aab c" in one line (three patterns), "d" split across chunks.
    w.feed(b"xx aab c\r\nsomething ");
    w.feed(b"else\n");
    assert_eq!(w.missing_expect().map(|(i, _)| i), Some(3));
    w.feed(b"and d");
    w.finish();

    // Assert
    assert!(w.missing_expect().is_none());
    assert_eq!(w.lines, 3);
}

#[test]
fn a_fail_on_match_closes_the_watcher_with_the_line() {
    let mut w = Watcher::new(WatchSpec {
        fail_on: default_fail_on(),
        ..WatchSpec::default()
    });
    w.feed(b"[    2.1] BUG: kernel NULL pointer dereference, address: 0\n[    2.2] more\n");
    let (pattern, line) = w.trouble.clone().unwrap();
    assert_eq!(pattern, r"\bBUG: ");
    assert!(line.ends_with("address: 0"));
    assert!(w.closed());
}

#[test]
fn the_default_patterns_catch_panics_oopses_and_warnings_but_not_ordinary_lines() {
    let hits = [
        "[   1.0] Kernel panic - not syncing: VFS: Unable to mount root fs",
        "[   1.0] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP",
        "[   1.0] Oops: 0002 [#1] PREEMPT SMP",
        "[   1.0] WARNING: CPU: 0 PID: 1 at lib/foo.c:12 foo+0x1/0x2",
        "[   1.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!",
    ];
    let misses = [
        "ok 1 example_simple_test",
        "a DEBUG: line",
        "no bugs here",
        "WARNING: something",
    ];
    let pats = default_fail_on();
    for h in hits {
        assert!(pats.iter().any(|p| p.is_match(h)), "{h}");
    }
    for m in misses {
        assert!(!pats.iter().any(|p| p.is_match(m)), "{m}");
    }
}

#[test]
fn the_channel_lines_give_ready_start_and_the_result() {
    let mut w = Watcher::new(WatchSpec {
        ready: Some(re("^ember-test: ready$")),
        channel: true,
        ..WatchSpec::default()
    });
    w.feed(b"ember-test: ready\n");
    assert!(w.ready && !w.started);
    w.feed(b"ember-test: start\nhello\nember-test: exit=7\nKernel panic - after the result\n");
    assert!(w.started);
    assert_eq!(w.result, Some(7));
    assert_eq!(w.last_line, "ember-test: exit=7");
}

#[test]
fn a_flood_without_newlines_keeps_memory_bounded() {
    let mut w = Watcher::new(WatchSpec {
        expect: vec![re("END")],
        ..WatchSpec::default()
    });
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..64 {
        w.feed(&chunk);
    }
    w.feed(b"END\n");
    assert!(w.line.capacity() <= 2 * MAX_LINE);
    // The end of an over-long line is not looked at.
    assert!(w.missing_expect().is_some());
    w.feed(b"END\n");
    assert!(w.missing_expect().is_none());
}

#[test]
fn ktap_output_is_parsed_and_reported_only_when_present() {
    let mut w = Watcher::new(WatchSpec {
        ktap: true,
        ..WatchSpec::default()
    });
    w.feed(b"[ 1.0] KTAP version 1\n[ 1.0] 1..1\n[ 1.0] ok 1 t\n");
    let k = w.take_ktap().unwrap();
    assert_eq!(k.counts.passed, 1);
    let mut none = Watcher::new(WatchSpec {
        ktap: true,
        ..WatchSpec::default()
    });
    none.feed(b"no tap here\n");
    assert!(none.take_ktap().is_none());
}

#[test]
fn the_log_file_stops_at_its_limit_and_says_how_much_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("case.log");
    let mut log = LogFile::create(&path, 10).unwrap();
    log.write(b"0123456").unwrap();
    log.write(b"789abcdef").unwrap();
    log.finish().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("0123456789\n[ember test: 6 more bytes"),
        "{text}"
    );
}
