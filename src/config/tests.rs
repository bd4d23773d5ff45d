use super::*;

#[test]
fn memory_bounds_name_the_option() {
    let e = parse_memory("8M").unwrap_err();
    assert_eq!(e.option, "--memory");
    assert!(e.message.contains("too small"));
    assert!(parse_memory("2T").is_err());
    assert!(parse_memory("100001K").is_err());
    assert_eq!(parse_memory("64M"), Ok(Size(64 << 20)));
}

#[test]
fn cpus_are_bounded() {
    let mut c = VmConfig::new("t", "k".into());
    c.cpus = "2".parse().unwrap();
    assert!(c.check().is_ok());
    for bad in ["0", "33", "boot=2,max=1"] {
        c.cpus = bad.parse().unwrap();
        assert_eq!(c.check().unwrap_err().option, "--cpus", "{bad}");
    }
    assert!("two".parse::<CpusConfig>().is_err());
}

#[test]
fn missing_or_empty_files_are_user_errors() {
    let e = check_readable_file("--kernel", Path::new("/nonexistent/bzImage")).unwrap_err();
    assert_eq!(e.option, "--kernel");
    assert!(e.message.contains("cannot open '/nonexistent/bzImage'"));
    let empty = tempfile::NamedTempFile::new().unwrap();
    let e = check_readable_file("--initrd", empty.path()).unwrap_err();
    assert!(e.message.contains("is empty"));
    let dir = tempfile::tempdir().unwrap();
    let e = check_readable_file("--kernel", dir.path()).unwrap_err();
    assert!(e.message.contains("not a regular file"));
}

#[test]
fn disks_parse_all_keys_and_bare_paths() {
    let d =
        DiskConfig::parse("path=a.qcow2,format=qcow2,readonly=on,serial=abc,cache=none,id=data")
            .unwrap();
    assert_eq!(d.path, PathBuf::from("a.qcow2"));
    assert_eq!(d.format, Some(DiskFormat::Qcow2));
    assert!(d.readonly);
    assert_eq!(d.serial.as_deref(), Some("abc"));
    assert_eq!(d.cache, DiskCache::None);
    assert_eq!(d.id.as_deref(), Some("data"));
    assert_eq!(
        DiskConfig::parse("disk.raw").unwrap().path,
        PathBuf::from("disk.raw")
    );
    assert!(DiskConfig::parse("file=x,ro=on").unwrap().readonly);
}

#[test]
fn bad_disk_specs_name_the_option() {
    for bad in [
        "format=qcow2",
        "path=a,format=vmdk",
        "path=a,readonly=maybe",
        "path=a,cache=directsync",
        "path=a,colour=red",
        "path=a,serial=123456789012345678901",
        "path=a,junk",
        "path=a,id=no/slash",
    ] {
        let e = DiskConfig::parse(bad).unwrap_err();
        assert_eq!(e.option, "--disk", "{bad}");
    }
}

#[test]
fn nets_parse_backends_mac_and_mtu() {
    let n = NetConfig::parse("tap=tap0,mac=52:54:00:ab:cd:ef,mtu=9000").unwrap();
    assert_eq!(n.backend(), NetBackendConfig::Tap("tap0".into()));
    assert_eq!(n.mac, Some(Mac([0x52, 0x54, 0, 0xab, 0xcd, 0xef])));
    assert_eq!(n.mtu, 9000);
    assert_eq!(
        NetConfig::parse("fd=5").unwrap().backend(),
        NetBackendConfig::Fd(5)
    );
    assert_eq!(
        NetConfig::parse("network=default").unwrap().backend(),
        NetBackendConfig::Network("default".into())
    );
    assert_eq!(NetConfig::parse("ifname=t1").unwrap().mtu, 1500);
}

#[test]
fn bad_nets_name_the_option() {
    for bad in [
        "tap=",
        "tap=a,network=b",
        "fd=1",
        "fd=x",
        "tap=t,mac=01:00:5e:00:00:01",
        "tap=t,mac=zz:00:00:00:00:00",
        "tap=t,mtu=10",
        "tap=t,speed=fast",
        "mac=52:54:00:00:00:01",
        "tap=name-much-too-long",
    ] {
        assert_eq!(NetConfig::parse(bad).unwrap_err().option, "--net", "{bad}");
    }
    assert!(parse_name("web-1").is_ok());
    assert_eq!(parse_name("a b").unwrap_err().option, "--name");
    assert!(parse_name(".hidden").is_err());
}

#[test]
fn normalize_assigns_ids_and_stable_macs() {
    let mut c = VmConfig::new("web", "k".into());
    c.disks = vec![
        DiskConfig::parse("a").unwrap(),
        DiskConfig::parse("b,id=data").unwrap(),
        DiskConfig::parse("c").unwrap(),
    ];
    c.nets = vec![NetConfig::parse("tap=t0").unwrap()];
    c.normalize("web");
    let ids: Vec<&str> = c.disks.iter().map(DiskConfig::id).collect();
    assert_eq!(ids, ["vda", "data", "vdc"]);
    assert_eq!(c.nets[0].id(), "eth0");
    assert_eq!(
        c.nets[0].mac,
        Some(Mac(devices::virtio::net::mac_for("web", 0)))
    );
    assert_eq!(disk_id(25), "vdz");
    assert_eq!(disk_id(26), "vdaa");
}

#[test]
fn duplicate_device_ids_are_refused() {
    let mut c = VmConfig::new("web", "k".into());
    c.disks = vec![
        DiskConfig::parse("a,id=x").unwrap(),
        DiskConfig::parse("b,id=x").unwrap(),
    ];
    assert!(c.check().unwrap_err().message.contains("id=x"));
}

#[test]
fn definitions_round_trip_through_toml_and_json() {
    let mut c = VmConfig::new("web", "/boot/vmlinux".into());
    c.memory = Size(128 << 20);
    c.cpus = "boot=1,max=2".parse().unwrap();
    c.root = Some("/dev/vda".into());
    c.cpu_features = "-cx16".parse().unwrap();
    c.disks = vec![DiskConfig::parse("/var/lib/web.qcow2,format=qcow2").unwrap()];
    c.nets = vec![NetConfig::parse("network=default").unwrap()];
    c.normalize("web");
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("memory = \"128M\""), "{text}");
    assert!(text.contains("[[disk]]"), "{text}");
    let back: VmConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, c);
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), c);
}

#[test]
fn a_handwritten_definition_reads_with_defaults() {
    let c: VmConfig = toml::from_str(
        r#"
        name = "db"
        kernel = "/k"
        memory = 64
        [[disk]]
        path = "/d.raw"
        "#,
    )
    .unwrap();
    assert_eq!(c.memory, Size(64 << 20));
    assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    assert!(c.debug_exit);
    assert_eq!(c.disks[0].path, PathBuf::from("/d.raw"));
    let e = toml::from_str::<VmConfig>("name = \"x\"\nkernel = \"/k\"\nmemroy = 1\n").unwrap_err();
    assert!(e.to_string().contains("memroy"), "{e}");
}

#[test]
fn transport_is_per_device_with_a_vm_default() {
    let d = DiskConfig::parse("path=a.raw,transport=pci").unwrap();
    assert_eq!(d.transport, Some(Transport::Pci));
    let n = NetConfig::parse("tap=t0,transport=mmio").unwrap();
    assert_eq!(n.transport, Some(Transport::Mmio));
    assert!(DiskConfig::parse("path=a.raw,transport=isa")
        .unwrap_err()
        .message
        .contains("isa"));

    let mut c = VmConfig::new("t", "k".into());
    assert_eq!(c.transport, Transport::Mmio, "virtio-mmio by default");
    assert!(!c.uses_pci());
    c.disks.push(DiskConfig::parse("a.raw").unwrap());
    assert!(!c.uses_pci());
    c.nets.push(n);
    c.disks.push(d);
    assert!(c.uses_pci(), "one device on PCI");
    c.disks.pop();
    c.transport = Transport::Pci;
    assert!(c.uses_pci(), "PCI by default");
}

#[test]
fn the_vm_transport_round_trips_through_definitions_and_is_omitted_when_default() {
    let mut c = VmConfig::new("t", "k".into());
    let text = toml::to_string(&c).unwrap();
    assert!(!text.contains("transport"), "{text}");
    c.transport = Transport::Pci;
    c.disks
        .push(DiskConfig::parse("path=a.raw,transport=mmio").unwrap());
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("transport = \"pci\""), "{text}");
    let back: VmConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, c);
}

#[test]
fn balloon_specs_parse_with_on_first_or_implied() {
    let b = BalloonConfig::parse(
        "on,target=128M,deflate_on_oom=on,free_page_reporting=on,stats_period=5,transport=pci",
    )
    .unwrap()
    .unwrap();
    assert_eq!(b.target, Some(Size(128 << 20)));
    assert!(b.deflate_on_oom && b.free_page_reporting);
    assert_eq!((b.stats_period, b.transport), (5, Some(Transport::Pci)));
    assert_eq!(
        BalloonConfig::parse("on"),
        Ok(Some(BalloonConfig::default()))
    );
    assert_eq!(
        BalloonConfig::parse("stats_period=2")
            .unwrap()
            .unwrap()
            .stats_period,
        2
    );
    assert_eq!(BalloonConfig::parse("off"), Ok(None));
}

#[test]
fn bad_balloon_specs_name_the_option() {
    for bad in [
        "maybe",
        "off,stats_period=1",
        "on,stats_period=70000",
        "on,colour=red",
        "on,target=12Q",
    ] {
        let e = BalloonConfig::parse(bad).unwrap_err();
        assert_eq!(e.option, "--balloon", "{bad}");
    }
    let mut c = VmConfig::new("t", "k".into());
    c.balloon = BalloonConfig::parse("target=512M").unwrap();
    let e = c.check().unwrap_err();
    assert_eq!(e.option, "--balloon");
    assert!(e.message.contains("at most --memory (256M)"), "{e}");
    c.balloon = BalloonConfig::parse("target=128M").unwrap();
    assert!(c.check().is_ok());
}

#[test]
fn the_balloon_round_trips_through_definitions_and_counts_as_a_device() {
    let mut c = VmConfig::new("t", "/k".into());
    c.balloon = BalloonConfig::parse("on,target=100M,stats_period=3").unwrap();
    let text = toml::to_string(&c).unwrap();
    assert!(text.contains("[balloon]"), "{text}");
    let back: VmConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, c);
    assert_eq!(c.virtio_devices(), 1);
    c.disks
        .push(DiskConfig::parse("path=a,id=balloon").unwrap());
    assert!(c.check().unwrap_err().message.contains("id=balloon"));
}

#[test]
fn track_dirty_pages_is_a_definition_key_written_only_when_on() {
    let c: VmConfig =
        toml::from_str("name = \"x\"\nkernel = \"/k\"\ntrack_dirty_pages = true\n").unwrap();
    assert!(c.track_dirty_pages);
    assert!(toml::to_string(&c)
        .unwrap()
        .contains("track_dirty_pages = true"));
    let off = VmConfig::new("x", "/k".into());
    assert!(!toml::to_string(&off).unwrap().contains("track_dirty_pages"));
}
