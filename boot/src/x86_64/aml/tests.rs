//! Byte-exact encodings hand-derived from ACPI 6.4 section 20 (and 6.4 for resource
//! descriptors), and a small AML walker that checks every package length lines up.

use super::*;

fn aml(terms: &[Term]) -> Vec<u8> {
    to_aml(terms).unwrap()
}

fn expr(e: Expr) -> Vec<u8> {
    let mut out = Vec::new();
    e.encode(&mut out).unwrap();
    out
}

fn pkg(len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    pkg_length(len, &mut out).unwrap();
    out
}

fn res(r: Resource) -> Vec<u8> {
    let mut out = Vec::new();
    r.encode(&mut out).unwrap();
    out
}

/// A package length walker over the subset of AML this builder emits. It parses every
/// object, checks that each PkgLength ends exactly where the object's contents do, and
/// returns the absolute paths of the named objects it defines.
pub(crate) mod walker {
    use std::collections::HashMap;

    pub struct Walker<'a> {
        b: &'a [u8],
        pos: usize,
        scope: Vec<String>,
        pub defined: Vec<String>,
        methods: HashMap<String, u8>,
    }

    type R<T> = Result<T, String>;

    impl<'a> Walker<'a> {
        pub fn walk(b: &'a [u8]) -> R<Vec<String>> {
            let mut w = Walker {
                b,
                pos: 0,
                scope: Vec::new(),
                defined: Vec::new(),
                methods: HashMap::new(),
            };
            w.term_list(b.len())?;
            Ok(w.defined)
        }

        fn byte(&mut self) -> R<u8> {
            let v = *self
                .b
                .get(self.pos)
                .ok_or(format!("truncated at {}", self.pos))?;
            self.pos += 1;
            Ok(v)
        }

        fn skip(&mut self, n: usize) -> R<()> {
            if self.pos + n > self.b.len() {
                return Err(format!("truncated at {}", self.pos));
            }
            self.pos += n;
            Ok(())
        }

        fn pkg_value(&mut self) -> R<usize> {
            let lead = self.byte()?;
            let extra = usize::from(lead >> 6);
            if extra == 0 {
                return Ok(usize::from(lead & 0x3f));
            }
            if lead & 0x30 != 0 {
                return Err(format!("reserved PkgLength bits set at {}", self.pos - 1));
            }
            let mut v = usize::from(lead & 0x0f);
            for i in 0..extra {
                v |= usize::from(self.byte()?) << (4 + 8 * i);
            }
            Ok(v)
        }

        /// Reads a PkgLength; returns where the object ends.
        fn pkg_end(&mut self) -> R<usize> {
            let start = self.pos;
            let end = start + self.pkg_value()?;
            if end > self.b.len() {
                return Err(format!("PkgLength at {start} runs past the end"));
            }
            Ok(end)
        }

        fn term_list(&mut self, end: usize) -> R<()> {
            while self.pos < end {
                self.object()?;
            }
            if self.pos != end {
                return Err(format!("object overruns its package: {} > {end}", self.pos));
            }
            Ok(())
        }

        fn name_string(&mut self) -> R<String> {
            let mut s = String::new();
            match self.b.get(self.pos) {
                Some(b'\\') => {
                    s.push('\\');
                    self.pos += 1;
                }
                _ => {
                    while self.b.get(self.pos) == Some(&b'^') {
                        s.push('^');
                        self.pos += 1;
                    }
                }
            }
            let count = match self.byte()? {
                0x00 => 0,
                0x2e => 2,
                0x2f => usize::from(self.byte()?),
                _ => {
                    self.pos -= 1;
                    1
                }
            };
            for i in 0..count {
                let seg = self.b.get(self.pos..self.pos + 4).ok_or("truncated name")?;
                let ok = seg
                    .iter()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
                    && !seg[0].is_ascii_digit();
                if !ok {
                    return Err(format!("bad NameSeg {seg:02x?} at {}", self.pos));
                }
                if i > 0 {
                    s.push('.');
                }
                s.push_str(std::str::from_utf8(seg).map_err(|e| e.to_string())?);
                self.pos += 4;
            }
            Ok(s)
        }

        fn absolute(&self, name: &str) -> String {
            if name.starts_with('\\') {
                return name.to_string();
            }
            let ups = name.chars().take_while(|c| *c == '^').count();
            let keep = self.scope.len().saturating_sub(ups);
            let mut parts: Vec<&str> = self.scope[..keep].iter().map(String::as_str).collect();
            parts.push(&name[ups..]);
            format!("\\{}", parts.join("."))
        }

        fn define(&mut self, name: &str) -> String {
            let abs = self.absolute(name);
            self.defined.push(abs.clone());
            abs
        }

        fn enter(&mut self, abs: &str, end: usize) -> R<()> {
            let saved = std::mem::take(&mut self.scope);
            self.scope = abs
                .trim_start_matches('\\')
                .split('.')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            self.term_list(end)?;
            self.scope = saved;
            Ok(())
        }

        fn target(&mut self) -> R<()> {
            if self.b.get(self.pos) == Some(&0x00) {
                self.pos += 1;
                return Ok(());
            }
            self.object()
        }

        fn args(&mut self, n: usize) -> R<()> {
            (0..n).try_for_each(|_| self.object())
        }

        fn object(&mut self) -> R<()> {
            let at = self.pos;
            let op = self.byte()?;
            match op {
                0x00 | 0x01 | 0xff => Ok(()),
                0x0a => self.skip(1),
                0x0b => self.skip(2),
                0x0c => self.skip(4),
                0x0e => self.skip(8),
                0x0d => {
                    while self.byte()? != 0 {}
                    Ok(())
                }
                0x08 => {
                    let n = self.name_string()?;
                    self.define(&n);
                    self.object()
                }
                0x10 => {
                    let end = self.pkg_end()?;
                    let n = self.name_string()?;
                    let abs = self.absolute(&n);
                    self.enter(&abs, end)
                }
                0x11 => {
                    let end = self.pkg_end()?;
                    self.object()?;
                    self.pos = end;
                    Ok(())
                }
                0x12 | 0x13 => {
                    let end = self.pkg_end()?;
                    if op == 0x12 {
                        self.skip(1)?;
                    } else {
                        self.object()?;
                    }
                    self.term_list(end)
                }
                0x14 => {
                    let end = self.pkg_end()?;
                    let n = self.name_string()?;
                    let flags = self.byte()?;
                    let abs = self.define(&n);
                    let seg = abs
                        .rsplit('.')
                        .next()
                        .unwrap_or("")
                        .trim_start_matches('\\');
                    self.methods.insert(seg.to_string(), flags & 7);
                    self.enter(&abs, end)
                }
                0x5b => self.ext_object(),
                b'\\' | b'^' | b'_' | b'A'..=b'Z' | 0x2e | 0x2f => {
                    self.pos = at;
                    let n = self.name_string()?;
                    let seg = n.rsplit(['.', '\\', '^']).next().unwrap_or("");
                    let argc = self.methods.get(seg).copied().unwrap_or(0);
                    self.args(usize::from(argc))
                }
                _ => self.operator(op, at),
            }
        }

        /// Locals, args and the operators with fixed operand shapes.
        fn operator(&mut self, op: u8, at: usize) -> R<()> {
            match op {
                0x60..=0x6e => Ok(()),
                0x70 | 0x96 => self.object().and_then(|_| self.target()),
                0x72 | 0x74 | 0x77 | 0x79 | 0x7a | 0x7b | 0x7d | 0x7f | 0x88 => {
                    self.args(2)?;
                    self.target()
                }
                0x75 | 0x76 | 0x87 => self.target(),
                0x83 | 0x92 | 0xa4 => self.object(),
                0x86 => self.target().and_then(|_| self.object()),
                0x8a | 0x8b | 0x8c | 0x8f => {
                    self.args(2)?;
                    let n = self.name_string()?;
                    self.define(&n);
                    Ok(())
                }
                0x90 | 0x91 | 0x93 | 0x94 | 0x95 => self.args(2),
                0xa0 | 0xa2 => {
                    let end = self.pkg_end()?;
                    self.object()?;
                    self.term_list(end)
                }
                0xa1 => {
                    let end = self.pkg_end()?;
                    self.term_list(end)
                }
                _ => Err(format!("unknown opcode {op:#04x} at {at}")),
            }
        }

        fn ext_object(&mut self) -> R<()> {
            let at = self.pos;
            match self.byte()? {
                0x01 => {
                    let n = self.name_string()?;
                    self.define(&n);
                    self.skip(1)
                }
                0x23 => self.target().and_then(|_| self.skip(2)),
                0x27 => self.target(),
                0x31 => Ok(()),
                0x80 => {
                    let n = self.name_string()?;
                    self.define(&n);
                    self.skip(1)?;
                    self.args(2)
                }
                0x81 => {
                    let end = self.pkg_end()?;
                    self.name_string()?;
                    self.skip(1)?;
                    while self.pos < end {
                        match self.byte()? {
                            0x00 => {
                                self.pkg_value()?;
                            }
                            0x01 => self.skip(2)?,
                            _ => {
                                self.pos -= 1;
                                let seg = String::from_utf8_lossy(&self.b[self.pos..self.pos + 4])
                                    .to_string();
                                self.define(&seg);
                                self.skip(4)?;
                                self.pkg_value()?;
                            }
                        }
                    }
                    (self.pos == end)
                        .then_some(())
                        .ok_or(format!("field list overruns at {}", self.pos))
                }
                0x82 => {
                    let end = self.pkg_end()?;
                    let n = self.name_string()?;
                    let abs = self.define(&n);
                    self.enter(&abs, end)
                }
                op => Err(format!("unknown extended opcode 0x5b {op:#04x} at {at}")),
            }
        }
    }
}

use walker::Walker;

// ---- Package lengths ----

#[test]
fn pkg_length_one_byte_up_to_63_including_itself() {
    assert_eq!(pkg(0), [0x01]);
    assert_eq!(pkg(62), [0x3f]);
}

#[test]
fn pkg_length_two_bytes_from_64_to_4095() {
    // 63 bytes of contents + 2 = 65 = 0x041: lead 0x40 | 0x1, then 0x04.
    assert_eq!(pkg(63), [0x41, 0x04]);
    // 4093 + 2 = 4095 = 0xfff.
    assert_eq!(pkg(4093), [0x4f, 0xff]);
}

#[test]
fn pkg_length_three_and_four_bytes_at_their_boundaries() {
    // 4094 + 3 = 4097 = 0x1001.
    assert_eq!(pkg(4094), [0x81, 0x00, 0x01]);
    // 0xffffc + 3 = 0xfffff.
    assert_eq!(pkg(0xf_fffc), [0x8f, 0xff, 0xff]);
    // 0xffffd + 4 = 0x100001.
    assert_eq!(pkg(0xf_fffd), [0xc1, 0x00, 0x00, 0x01]);
    assert_eq!(pkg((1 << 28) - 5), [0xcf, 0xff, 0xff, 0xff]);
    let mut out = Vec::new();
    assert_eq!(
        pkg_length((1 << 28) - 4, &mut out),
        Err(AmlError::TooLong(1 << 28))
    );
}

#[test]
fn pkg_length_never_lands_on_a_value_the_lead_byte_cannot_hold() {
    for len in (0..70).chain(4080..4110).chain(0xf_fff0..0x10_0010) {
        let enc = pkg(len);
        // Decode: the value must be the contents plus the encoding's own bytes.
        let extra = usize::from(enc[0] >> 6);
        assert_eq!(enc.len(), extra + 1);
        let mut v = if extra == 0 {
            usize::from(enc[0])
        } else {
            usize::from(enc[0] & 0xf)
        };
        for (i, b) in enc[1..].iter().enumerate() {
            v |= usize::from(*b) << (4 + 8 * i);
        }
        assert_eq!(v, len + enc.len(), "len {len}");
    }
}

#[test]
fn buffer_of_60_and_61_bytes_crosses_the_one_byte_pkg_length() {
    // Contents: BufferSize (0x0a n) + n bytes.
    let b60 = expr(Expr::Buffer(vec![0xaa; 60]));
    assert_eq!(&b60[..4], &[0x11, 0x3f, 0x0a, 60]);
    assert_eq!(b60.len(), 64);
    let b61 = expr(Expr::Buffer(vec![0xaa; 61]));
    assert_eq!(&b61[..5], &[0x11, 0x41, 0x04, 0x0a, 61]);
    assert_eq!(b61.len(), 66);
}

#[test]
fn buffer_of_4092_bytes_takes_a_three_byte_pkg_length() {
    // Contents: 0x0b + u16 size + 4092 bytes = 4095, + 3 = 4098 = 0x1002.
    let b = expr(Expr::Buffer(vec![0; 4092]));
    assert_eq!(&b[..7], &[0x11, 0x82, 0x00, 0x01, 0x0b, 0xfc, 0x0f]);
    Walker::walk(&b).unwrap();
}

// ---- Data objects ----

#[test]
fn integers_take_the_smallest_encoding() {
    assert_eq!(expr(Expr::Int(0)), [0x00]);
    assert_eq!(expr(Expr::Int(1)), [0x01]);
    assert_eq!(expr(Expr::Int(2)), [0x0a, 0x02]);
    assert_eq!(expr(Expr::Int(0xff)), [0x0a, 0xff]);
    assert_eq!(expr(Expr::Int(0x100)), [0x0b, 0x00, 0x01]);
    assert_eq!(expr(Expr::Int(0xffff)), [0x0b, 0xff, 0xff]);
    assert_eq!(expr(Expr::Int(0x1_0000)), [0x0c, 0x00, 0x00, 0x01, 0x00]);
    assert_eq!(expr(Expr::Int(0xffff_ffff)), [0x0c, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(
        expr(Expr::Int(0x1_0000_0000)),
        [0x0e, 0, 0, 0, 0, 1, 0, 0, 0]
    );
    assert_eq!(expr(Expr::Int(u64::MAX)), [0xff]);
}

#[test]
fn strings_are_null_terminated_ascii() {
    assert_eq!(expr(Expr::string("QEMU0001")), b"\x0dQEMU0001\x00".to_vec());
    let mut out = Vec::new();
    assert!(Expr::string("a\0b").encode(&mut out).is_err());
    assert!(Expr::string("é").encode(&mut out).is_err());
}

#[test]
fn eisa_ids_compress_to_big_endian_dwords() {
    assert_eq!(
        expr(Expr::eisa_id("PNP0303")),
        [0x0c, 0x41, 0xd0, 0x03, 0x03]
    );
    assert_eq!(
        expr(Expr::eisa_id("PNP0A03")),
        [0x0c, 0x41, 0xd0, 0x0a, 0x03]
    );
    for bad in ["QEMU0001", "pnp0303", "PNP030G", "PN0303", "PNP03031"] {
        assert_eq!(
            Expr::eisa_id(bad).encode(&mut Vec::new()),
            Err(AmlError::EisaId(bad.into()))
        );
    }
}

#[test]
fn name_of_s5_package_matches_the_hand_written_bytes() {
    let t = Term::name(
        "_S5",
        Expr::Package(vec![5.into(), 5.into(), 0.into(), 0.into()]),
    );
    assert_eq!(
        aml(&[t]),
        [0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0]
    );
}

#[test]
fn package_over_255_elements_becomes_a_var_package() {
    let p = expr(Expr::Package(vec![Expr::Int(0); 256]));
    // VarPackageOp, PkgLength (3 + 256 = 259 + 2 = 261 = 0x105), NumElements 0x0b 0x0100.
    assert_eq!(&p[..6], &[0x13, 0x45, 0x10, 0x0b, 0x00, 0x01]);
    Walker::walk(&p).unwrap();
}

#[test]
fn package_elements_and_names_must_be_data() {
    let p = Expr::Package(vec![Expr::Local(0)]);
    assert_eq!(
        p.encode(&mut Vec::new()),
        Err(AmlError::NotData("package element"))
    );
    let ok = expr(Expr::Package(vec![Expr::path("\\_SB_.PCI0")]));
    assert_eq!(ok[2], 1);
    assert_eq!(
        to_aml(&[Term::name("X", Expr::Local(1))]),
        Err(AmlError::NotData("the value of Name"))
    );
}

// ---- Names ----

#[test]
fn name_strings_encode_root_parent_and_multi_segment_paths() {
    let enc = |s: &str| {
        let mut out = Vec::new();
        name_string(s, &mut out).map(|_| out)
    };
    assert_eq!(enc("_S5").unwrap(), b"_S5_");
    assert_eq!(enc("\\").unwrap(), [b'\\', 0x00]);
    assert_eq!(enc("\\_SB").unwrap(), b"\\_SB_");
    assert_eq!(enc("\\_SB.PCI0").unwrap(), b"\\\x2e_SB_PCI0");
    assert_eq!(enc("^^FOO").unwrap(), b"^^FOO_");
    assert_eq!(enc("^").unwrap(), [b'^', 0x00]);
    assert_eq!(enc("\\A.B.C").unwrap(), b"\\\x2f\x03A___B___C___");
    assert_eq!(enc("PCI0.S08.FN2").unwrap(), b"\x2f\x03PCI0S08_FN2_");
    for bad in [
        "", "1ABC", "ABCDE", "a", "\\_SB..X", "^\\X", "A.", "\\^A", "A-B",
    ] {
        assert_eq!(enc(bad), Err(AmlError::Name(bad.into())), "{bad:?}");
    }
}

// ---- Named objects and statements ----

#[test]
fn method_returning_a_constant() {
    let m = Term::method("_STA", 0, vec![Term::ret(Expr::Int(0x0f))]);
    assert_eq!(
        aml(&[m]),
        [0x14, 0x09, b'_', b'S', b'T', b'A', 0x00, 0xa4, 0x0a, 0x0f]
    );
}

#[test]
fn method_flags_hold_args_serialized_and_sync_level() {
    let m = Term::Method {
        name: "MTHD".into(),
        args: 2,
        serialized: true,
        sync_level: 3,
        body: vec![],
    };
    assert_eq!(aml(&[m]), [0x14, 0x06, b'M', b'T', b'H', b'D', 0x3a]);
    let bad = Term::method("BAD", 8, vec![]);
    assert!(matches!(
        to_aml(&[bad]),
        Err(AmlError::Method { args: 8, .. })
    ));
}

#[test]
fn if_else_with_logical_compare() {
    let t = Term::if_else(
        Expr::logic(LogicOp::LEqual, Expr::Arg(0), Expr::Int(1)),
        vec![Term::ret(Expr::Int(1))],
        vec![Term::ret(Expr::Int(0))],
    );
    assert_eq!(
        aml(&[t]),
        [0xa0, 0x06, 0x93, 0x68, 0x01, 0xa4, 0x01, 0xa1, 0x03, 0xa4, 0x00]
    );
}

#[test]
fn while_loop_with_increment() {
    let t = Term::While(
        Expr::logic(LogicOp::LLess, Expr::Local(0), Expr::Int(0x10)),
        vec![Term::Eval(Expr::Increment(Target::Local(0)))],
    );
    assert_eq!(aml(&[t]), [0xa2, 0x07, 0x95, 0x60, 0x0a, 0x10, 0x75, 0x60]);
}

#[test]
fn store_of_arithmetic_and_logic_operators() {
    let add = Expr::binary(BinaryOp::Add, Expr::Local(0), Expr::Arg(1), Target::Null);
    assert_eq!(
        aml(&[Term::store(add, Target::Local(2))]),
        [0x70, 0x72, 0x60, 0x69, 0x00, 0x62]
    );
    let ops = [
        (BinaryOp::Subtract, 0x74),
        (BinaryOp::And, 0x7b),
        (BinaryOp::Or, 0x7d),
        (BinaryOp::ShiftLeft, 0x79),
        (BinaryOp::ShiftRight, 0x7a),
    ];
    for (op, code) in ops {
        let e = Expr::binary(op, Expr::Arg(0), Expr::Int(4), Target::Local(7));
        assert_eq!(expr(e), [code, 0x68, 0x0a, 0x04, 0x67]);
    }
    let land = Expr::logic(
        LogicOp::LAnd,
        Expr::lnot(Expr::Arg(6)),
        Expr::logic(LogicOp::LLess, Expr::Local(1), Expr::Local(2)),
    );
    assert_eq!(expr(land), [0x90, 0x92, 0x6e, 0x95, 0x61, 0x62]);
}

#[test]
fn locals_and_args_out_of_range_are_errors() {
    assert_eq!(
        Expr::Local(8).encode(&mut Vec::new()),
        Err(AmlError::Local(8))
    );
    assert_eq!(Expr::Arg(7).encode(&mut Vec::new()), Err(AmlError::Arg(7)));
    let t = Term::store(Expr::Int(0), Target::Arg(7));
    assert_eq!(to_aml(&[t]), Err(AmlError::Arg(7)));
}

#[test]
fn notify_and_method_call() {
    let n = Term::Notify(Target::Path("\\_SB_.PCI0".into()), Expr::Int(1));
    assert_eq!(aml(&[n]), b"\x86\\\x2e_SB_PCI0\x01");
    let c = Term::Eval(Expr::call("MTHD", vec![Expr::Int(1), Expr::Arg(0)]));
    assert_eq!(aml(&[c]), b"MTHD\x01\x68");
}

#[test]
fn buffer_reference_operators() {
    assert_eq!(
        expr(Expr::ToBuffer(Box::new(Expr::Arg(0)), Target::Local(0))),
        [0x96, 0x68, 0x60]
    );
    assert_eq!(expr(Expr::SizeOf(Target::Arg(0))), [0x87, 0x68]);
    let idx = Expr::Index(Box::new(Expr::Arg(0)), Box::new(Expr::Int(1)), Target::Null);
    assert_eq!(
        expr(Expr::DerefOf(Box::new(idx))),
        [0x83, 0x88, 0x68, 0x01, 0x00]
    );
    let t = Term::store(
        Expr::Int(2),
        Target::Index(Box::new(Expr::path("PKG0")), Box::new(Expr::Int(0))),
    );
    assert_eq!(aml(&[t]), b"\x70\x0a\x02\x88PKG0\x00\x00");
    let c = Term::CreateField(FieldWidth::DWord, Expr::Arg(0), Expr::Int(4), "CDW2".into());
    assert_eq!(aml(&[c]), b"\x8a\x68\x0a\x04CDW2");
}

#[test]
fn operation_region_and_field_with_offset() {
    let r = Term::OpRegion {
        name: "PEOR".into(),
        space: RegionSpace::SystemIo,
        offset: Expr::Int(0x505),
        len: Expr::Int(1),
    };
    assert_eq!(aml(&[r]), b"\x5b\x80PEOR\x01\x0b\x05\x05\x01");
    let f = Term::Field {
        region: "PEOR".into(),
        access: AccessType::Byte,
        lock: false,
        update: UpdateRule::Preserve,
        entries: vec![
            FieldEntry::Named("PEPT".into(), 8),
            FieldEntry::Offset(2),
            FieldEntry::Named("FLD2".into(), 16),
            FieldEntry::Reserved(64),
            FieldEntry::Named("WIDE".into(), 0x100),
        ],
    };
    // Offset (2) after 8 bits: 8 reserved bits. 64 bits: two-byte PkgLength value 0x40.
    assert_eq!(
        aml(&[f]),
        b"\x5b\x81\x1bPEOR\x01PEPT\x08\x00\x08FLD2\x10\x00\x40\x04WIDE\x40\x10".to_vec()
    );
}

#[test]
fn field_flags_and_bad_fields() {
    let f = |entries| Term::Field {
        region: "REGN".into(),
        access: AccessType::Word,
        lock: true,
        update: UpdateRule::WriteAsZeros,
        entries,
    };
    let ok = aml(&[f(vec![FieldEntry::Named("A".into(), 1)])]);
    assert_eq!(ok, b"\x5b\x81\x0bREGN\x52A___\x01");
    assert_eq!(
        to_aml(&[f(vec![
            FieldEntry::Named("A".into(), 16),
            FieldEntry::Offset(1)
        ])]),
        Err(AmlError::FieldOffset { offset: 1, at: 16 })
    );
    assert_eq!(
        to_aml(&[f(vec![FieldEntry::Named("A.B".into(), 1)])]),
        Err(AmlError::NameSeg("A.B".into()))
    );
}

#[test]
fn mutex_acquire_release() {
    let t = [
        Term::Mutex("MTX0".into(), 0),
        Term::Eval(Expr::Acquire("MTX0".into(), 0xffff)),
        Term::Release("MTX0".into()),
    ];
    assert_eq!(
        aml(&t),
        b"\x5b\x01MTX0\x00\x5b\x23MTX0\xff\xff\x5b\x27MTX0".to_vec()
    );
    assert!(to_aml(&[Term::Mutex("M".into(), 16)]).is_err());
}

#[test]
fn scope_and_device() {
    let t = Term::scope(
        "\\_SB",
        vec![Term::device("DEV0", vec![Term::name("_UID", Expr::Int(0))])],
    );
    // Device: 0x5b 0x82 PkgLength(4 + 6 = 10 + 1) DEV0 Name(_UID, Zero).
    let dev = b"\x5b\x82\x0bDEV0\x08_UID\x00";
    let mut want = vec![0x10, 0x13, b'\\', b'_', b'S', b'B', b'_'];
    want.extend_from_slice(dev);
    assert_eq!(aml(&[t]), want);
}

// ---- Resource descriptors ----

#[test]
fn io_and_irq_no_flags_descriptors() {
    assert_eq!(
        res(Resource::io_fixed(0x60, 1)),
        [0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01]
    );
    assert_eq!(res(Resource::IrqNoFlags(vec![1])), [0x22, 0x02, 0x00]);
    assert_eq!(res(Resource::IrqNoFlags(vec![4, 12])), [0x22, 0x10, 0x10]);
    assert!(Resource::IrqNoFlags(vec![16])
        .encode(&mut Vec::new())
        .is_err());
}

#[test]
fn extended_interrupt_descriptor() {
    let r = Resource::Interrupt {
        usage: Usage::Consumer,
        edge: false,
        active_low: false,
        shared: false,
        irqs: vec![9],
    };
    assert_eq!(res(r), [0x89, 0x06, 0x00, 0x01, 0x01, 9, 0, 0, 0]);
    let r = Resource::Interrupt {
        usage: Usage::Consumer,
        edge: true,
        active_low: true,
        shared: true,
        irqs: vec![5, 6],
    };
    assert_eq!(
        res(r),
        [0x89, 0x0a, 0x00, 0x0f, 0x02, 5, 0, 0, 0, 6, 0, 0, 0]
    );
    let none = Resource::Interrupt {
        usage: Usage::Consumer,
        edge: true,
        active_low: false,
        shared: false,
        irqs: vec![],
    };
    assert!(none.encode(&mut Vec::new()).is_err());
}

#[test]
fn memory32_fixed_descriptor() {
    let r = Resource::Memory32Fixed {
        writeable: true,
        base: 0xfec0_0000,
        len: 0x1000,
    };
    assert_eq!(
        res(r),
        [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0xc0, 0xfe, 0x00, 0x10, 0x00, 0x00]
    );
}

#[test]
fn word_bus_number_and_word_io_descriptors() {
    let bus = Resource::WordBusNumber(AddressRange {
        usage: Usage::Producer,
        min: 0,
        max: 0xff,
        translation: 0,
    });
    assert_eq!(
        res(bus),
        [0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0xff, 0, 0, 0, 0x00, 0x01]
    );
    let io = Resource::WordIo(AddressRange {
        usage: Usage::Producer,
        min: 0,
        max: 0x0cf7,
        translation: 0,
    });
    assert_eq!(
        res(io),
        [0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0, 0, 0, 0, 0xf7, 0x0c, 0, 0, 0xf8, 0x0c]
    );
}

#[test]
fn dword_and_qword_memory_descriptors() {
    let d = Resource::DWordMemory {
        range: AddressRange {
            usage: Usage::Producer,
            min: 0xe000_0000,
            max: 0xfebf_ffff,
            translation: 0,
        },
        cacheable: Cacheable::NonCacheable,
        writeable: true,
    };
    let mut want = vec![0x87, 0x17, 0x00, 0x00, 0x0c, 0x01];
    for v in [0u32, 0xe000_0000, 0xfebf_ffff, 0, 0x1ec0_0000] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(res(d), want);
    let q = Resource::QWordMemory {
        range: AddressRange {
            usage: Usage::Consumer,
            min: 0x80_0000_0000,
            max: 0xff_ffff_ffff,
            translation: 0,
        },
        cacheable: Cacheable::Prefetchable,
        writeable: false,
    };
    let mut want = vec![0x8a, 0x2b, 0x00, 0x00, 0x0d, 0x06];
    for v in [0u64, 0x80_0000_0000, 0xff_ffff_ffff, 0, 0x80_0000_0000] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    assert_eq!(res(q), want);
}

#[test]
fn address_ranges_must_not_be_empty_or_wrap() {
    let r = |min, max| {
        Resource::WordBusNumber(AddressRange {
            usage: Usage::Producer,
            min,
            max,
            translation: 0,
        })
    };
    assert!(r(1, 0).encode(&mut Vec::new()).is_err());
    assert!(r(0, 0xffff).encode(&mut Vec::new()).is_err());
}

#[test]
fn resource_template_ends_with_a_tag_whose_checksum_zeroes_the_sum() {
    let t = expr(Expr::ResourceTemplate(vec![
        Resource::io_fixed(0x60, 1),
        Resource::io_fixed(0x64, 1),
        Resource::IrqNoFlags(vec![1]),
    ]));
    // Buffer: 0x11, PkgLength(2 + 21 = 23 + 1), BufferSize 0x0a 21, descriptors.
    assert_eq!(&t[..4], &[0x11, 0x18, 0x0a, 21]);
    let body = &t[4..];
    assert_eq!(body.len(), 21);
    assert_eq!(body[19], 0x79);
    assert_eq!(body.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
}

// ---- Walking what we build ----

#[test]
fn walker_finds_every_object_of_a_nested_table_and_its_ends_line_up() {
    let terms = vec![
        Term::name(
            "_S5",
            Expr::Package(vec![5.into(), 5.into(), 0.into(), 0.into()]),
        ),
        Term::scope(
            "\\_SB",
            vec![
                Term::Mutex("MTX0".into(), 0),
                Term::device(
                    "DEV0",
                    vec![
                        Term::name("_HID", Expr::eisa_id("PNP0A03")),
                        Term::name("BIG_", Expr::Buffer(vec![0; 5000])),
                        Term::OpRegion {
                            name: "REG0".into(),
                            space: RegionSpace::PciConfig,
                            offset: Expr::Int(0),
                            len: Expr::Int(0x100),
                        },
                        Term::Field {
                            region: "REG0".into(),
                            access: AccessType::DWord,
                            lock: true,
                            update: UpdateRule::Preserve,
                            entries: vec![
                                FieldEntry::Named("VID".into(), 16),
                                FieldEntry::Offset(0x40),
                                FieldEntry::Named("CTRL".into(), 32),
                            ],
                        },
                        Term::serialized_method(
                            "ADD2",
                            2,
                            vec![Term::ret(Expr::binary(
                                BinaryOp::Add,
                                Expr::Arg(0),
                                Expr::Arg(1),
                                Target::Null,
                            ))],
                        ),
                        Term::method(
                            "_STA",
                            0,
                            vec![
                                Term::Eval(Expr::Acquire("^MTX0".into(), 0xffff)),
                                Term::store(
                                    Expr::call("ADD2", vec![Expr::Int(1), Expr::Int(2)]),
                                    Target::Local(0),
                                ),
                                Term::Release("^MTX0".into()),
                                Term::ret(Expr::Local(0)),
                            ],
                        ),
                    ],
                ),
            ],
        ),
    ];
    let bytes = aml(&terms);
    let names = Walker::walk(&bytes).unwrap();
    assert_eq!(
        names,
        [
            "\\_S5_",
            "\\_SB_.MTX0",
            "\\_SB_.DEV0",
            "\\_SB_.DEV0._HID",
            "\\_SB_.DEV0.BIG_",
            "\\_SB_.DEV0.REG0",
            "\\_SB_.DEV0.VID_",
            "\\_SB_.DEV0.CTRL",
            "\\_SB_.DEV0.ADD2",
            "\\_SB_.DEV0._STA",
        ]
    );
}

#[test]
fn walker_rejects_a_package_length_that_is_off_by_one() {
    let mut bytes = aml(&[Term::scope("\\_SB", vec![Term::name("X", Expr::Int(7))])]);
    Walker::walk(&bytes).unwrap();
    bytes[1] -= 1;
    assert!(Walker::walk(&bytes).is_err());
}

// ---- Against the reference compiler ----

fn range<T: Default>(usage: Usage, min: T, max: T) -> AddressRange<T> {
    AddressRange {
        usage,
        min,
        max,
        translation: T::default(),
    }
}

/// The `_CRS` of `kitchen_sink.asl`: one of each resource descriptor.
fn kitchen_sink_crs() -> Expr {
    Expr::ResourceTemplate(vec![
        Resource::io_fixed(0x60, 1),
        Resource::IrqNoFlags(vec![1]),
        Resource::Interrupt {
            usage: Usage::Consumer,
            edge: false,
            active_low: false,
            shared: false,
            irqs: vec![9],
        },
        Resource::Memory32Fixed {
            writeable: true,
            base: 0xfec0_0000,
            len: 0x1000,
        },
        Resource::WordBusNumber(range(Usage::Producer, 0, 0xff)),
        Resource::WordIo(range(Usage::Producer, 0, 0xcf7)),
        Resource::DWordMemory {
            range: range(Usage::Producer, 0xe000_0000, 0xfebf_ffff),
            cacheable: Cacheable::NonCacheable,
            writeable: true,
        },
        Resource::QWordMemory {
            range: range(Usage::Consumer, 0x80_0000_0000, 0xff_ffff_ffff),
            cacheable: Cacheable::Prefetchable,
            writeable: false,
        },
    ])
}

/// The named data, regions and fields of DEV0 in `kitchen_sink.asl`.
fn kitchen_sink_data() -> Vec<Term> {
    vec![
        Term::name("_HID", Expr::eisa_id("PNP0A03")),
        Term::name("_CRS", kitchen_sink_crs()),
        Term::OpRegion {
            name: "REG0".into(),
            space: RegionSpace::PciConfig,
            offset: Expr::Int(0),
            len: Expr::Int(0x100),
        },
        Term::Field {
            region: "REG0".into(),
            access: AccessType::DWord,
            lock: true,
            update: UpdateRule::Preserve,
            entries: vec![
                FieldEntry::Named("VID".into(), 16),
                FieldEntry::Offset(0x40),
                FieldEntry::Named("CTRL".into(), 32),
            ],
        },
        Term::OpRegion {
            name: "PEOR".into(),
            space: RegionSpace::SystemIo,
            offset: Expr::Int(0x505),
            len: Expr::Int(1),
        },
        Term::Field {
            region: "PEOR".into(),
            access: AccessType::Byte,
            lock: false,
            update: UpdateRule::WriteAsZeros,
            entries: vec![FieldEntry::Named("PEPT".into(), 8)],
        },
        Term::OpRegion {
            name: "MEM0".into(),
            space: RegionSpace::SystemMemory,
            offset: Expr::Int(0xfed0_0000),
            len: Expr::Int(0x400),
        },
        Term::name("BIG0", Expr::Int(0x1_0000_0000)),
        Term::name("ALL1", Expr::Int(u64::MAX)),
        Term::name("BUF0", Expr::Buffer(vec![1, 2, 3])),
        Term::name(
            "PKG0",
            Expr::Package(vec![Expr::string("QEMU0001"), Expr::path("\\_SB.DEV0")]),
        ),
    ]
}

/// The methods of DEV0 in `kitchen_sink.asl`.
fn kitchen_sink_methods() -> Vec<Term> {
    let store = |e, l| Term::store(e, Target::Local(l));
    let bin = |op, a, b| Expr::binary(op, a, b, Target::Null);
    vec![
        Term::serialized_method(
            "ADD2",
            2,
            vec![Term::ret(bin(BinaryOp::Add, Expr::Arg(0), Expr::Arg(1)))],
        ),
        Term::method(
            "_STA",
            0,
            vec![
                Term::Eval(Expr::Acquire("^^MTX0".into(), 0xffff)),
                store(Expr::call("ADD2", vec![Expr::Int(1), Expr::Int(2)]), 0),
                Term::Release("^^MTX0".into()),
                Term::if_else(
                    Expr::logic(LogicOp::LEqual, Expr::Local(0), Expr::Int(3)),
                    vec![Term::ret(Expr::Int(0x0f))],
                    vec![Term::ret(Expr::Int(0))],
                ),
            ],
        ),
        Term::method(
            "LOOP",
            1,
            vec![
                store(Expr::Int(0), 0),
                Term::While(
                    Expr::logic(LogicOp::LLess, Expr::Local(0), Expr::Arg(0)),
                    vec![
                        Term::Eval(Expr::Increment(Target::Local(0))),
                        store(bin(BinaryOp::ShiftLeft, Expr::Local(0), Expr::Int(4)), 1),
                        store(bin(BinaryOp::ShiftRight, Expr::Local(1), Expr::Int(1)), 2),
                        store(bin(BinaryOp::And, Expr::Local(2), Expr::Int(0xff)), 3),
                        store(bin(BinaryOp::Or, Expr::Local(3), Expr::Int(0x100)), 4),
                        store(bin(BinaryOp::Subtract, Expr::Local(4), Expr::Int(1)), 5),
                    ],
                ),
                Term::if_then(
                    Expr::logic(
                        LogicOp::LAnd,
                        Expr::lnot(Expr::Arg(0)),
                        Expr::logic(LogicOp::LLess, Expr::Local(0), Expr::Int(0x10)),
                    ),
                    vec![Term::Notify(
                        Target::Path("\\_SB.DEV0".into()),
                        Expr::Int(1),
                    )],
                ),
                Term::ret(Expr::Local(5)),
            ],
        ),
        Term::method(
            "BUFS",
            1,
            vec![
                Term::CreateField(FieldWidth::DWord, Expr::Arg(0), Expr::Int(4), "CDW2".into()),
                store(Expr::ToBuffer(Box::new(Expr::Arg(0)), Target::Null), 0),
                store(Expr::SizeOf(Target::Local(0)), 1),
                store(
                    Expr::DerefOf(Box::new(Expr::Index(
                        Box::new(Expr::path("PKG0")),
                        Box::new(Expr::Int(1)),
                        Target::Null,
                    ))),
                    2,
                ),
                Term::store(Expr::Int(0x1234_5678), Target::Path("CDW2".into())),
                Term::ret(bin(BinaryOp::Add, Expr::Local(1), Expr::Local(2))),
            ],
        ),
    ]
}

/// The same definitions as `kitchen_sink.asl`, built with this module.
fn kitchen_sink() -> Vec<Term> {
    let mut device = kitchen_sink_data();
    device.extend(kitchen_sink_methods());
    vec![
        Term::name(
            "_S5",
            Expr::Package(vec![5.into(), 5.into(), 0.into(), 0.into()]),
        ),
        Term::scope(
            "\\_SB",
            vec![Term::Mutex("MTX0".into(), 0), Term::device("DEV0", device)],
        ),
    ]
}

#[test]
fn kitchen_sink_walks_cleanly() {
    let names = Walker::walk(&aml(&kitchen_sink())).unwrap();
    assert!(names.contains(&"\\_SB_.DEV0.BUFS.CDW2".to_string()));
    assert!(names.contains(&"\\_SB_.DEV0.PEPT".to_string()));
    // iasl counts 20 named objects in kitchen_sink.asl.
    assert_eq!(names.len(), 20);
}

/// Runs `iasl` with `args` in `dir`; returns its output, failing the test on any error,
/// warning or remark.
pub(crate) fn iasl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("iasl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("iasl (apt-get install acpica-tools) must be installed for this test");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
    for bad in ["Error ", "Warning ", "Remark "] {
        assert!(
            !text.contains(bad),
            "iasl {args:?} reported problems:\n{text}"
        );
    }
    text
}

/// A definition block with a header around `body`.
pub(crate) fn ssdt(body: &[u8]) -> Vec<u8> {
    let mut t = b"SSDT\0\0\0\0\x02\0EMBER KITCHEN \x01\0\0\0EMBR\x01\0\0\0".to_vec();
    t.extend_from_slice(body);
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = t.iter().fold(0u8, |a, b| a.wrapping_sub(*b));
    t
}

#[test]
#[ignore = "needs iasl from acpica-tools"]
fn kitchen_sink_matches_what_iasl_compiles_from_the_same_asl() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ref.asl"), include_str!("kitchen_sink.asl")).unwrap();
    // -oa: no optimizations, so names and integers stay as written.
    iasl(dir.path(), &["-oa", "-p", "ref", "ref.asl"]);
    let reference = std::fs::read(dir.path().join("ref.aml")).unwrap();
    let ours = aml(&kitchen_sink());
    let reference = &reference[36..];
    assert_eq!(ours.len(), reference.len());
    // iasl writes 0 ("treat as valid") for the end tag's checksum; we write the real one.
    let differ: Vec<usize> = (0..ours.len())
        .filter(|&i| ours[i] != reference[i])
        .collect();
    assert_eq!(
        differ.len(),
        1,
        "ours vs iasl:\n{ours:02x?}\n{reference:02x?}"
    );
    let i = differ[0];
    assert_eq!(
        (ours[i - 1], reference[i - 1], reference[i]),
        (0x79, 0x79, 0x00)
    );
}

#[test]
#[ignore = "needs iasl from acpica-tools"]
fn iasl_disassembles_the_kitchen_sink_without_complaint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ks.dat"), ssdt(&aml(&kitchen_sink()))).unwrap();
    iasl(dir.path(), &["-d", "ks.dat"]);
    // And what it disassembled compiles back without complaint.
    iasl(dir.path(), &["-p", "again", "ks.dsl"]);
}
