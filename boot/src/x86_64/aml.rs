//! A small, typed builder for AML, the bytecode of ACPI definition blocks (DSDT, SSDT).
//!
//! Statements are [`Term`]s, values are [`Expr`]s, places a result is stored are [`Target`]s;
//! resource descriptors for `_CRS` are [`Resource`]s. Nothing is encoded until [`to_aml`]
//! walks the tree, which is where every name, length and range is checked: a bad name or an
//! oversized package is an [`AmlError`], never a panic or a silently wrong table.
//!
//! Encodings follow the ACPI 6.4 specification, section 20 ("ACPI Machine Language
//! Specification"), and section 6.4 for resource descriptors.

use std::fmt;

/// Errors of encoding AML.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmlError {
    /// A NameString that is not `\`/`^` prefixes and 1-4 character segments of `A-Z0-9_`.
    #[error("invalid AML name {0:?}")]
    Name(String),
    /// Something needs a single NameSeg (a field unit name) and got a path.
    #[error("{0:?} is not a single name segment")]
    NameSeg(String),
    /// A package length past the 28 bits AML can encode.
    #[error("AML object of {0} bytes is too large to encode")]
    TooLong(usize),
    /// There are Local0 to Local7 only.
    #[error("Local{0} does not exist")]
    Local(u8),
    /// There are Arg0 to Arg6 only.
    #[error("Arg{0} does not exist")]
    Arg(u8),
    /// AML strings hold ASCII 0x01-0x7f only.
    #[error("string {0:?} holds a character AML strings cannot")]
    String(String),
    /// An EISA id is three capital letters and four hex digits.
    #[error("invalid EISA id {0:?}")]
    EisaId(String),
    /// A method takes at most 7 arguments and has a sync level of at most 15.
    #[error("method {name}: {args} arguments / sync level {sync_level} out of range")]
    Method {
        /// The method's name.
        name: String,
        /// Its argument count.
        args: u8,
        /// Its sync level.
        sync_level: u8,
    },
    /// A mutex sync level above 15.
    #[error("mutex {0}: sync level above 15")]
    SyncLevel(String),
    /// A `Name` or package element that is not data (or, in a package, a name).
    #[error("{0} is not a data object")]
    NotData(&'static str),
    /// A field `Offset` that moves backwards.
    #[error("field offset {offset:#x} lies before bit {at} already laid out")]
    FieldOffset {
        /// The requested byte offset.
        offset: u32,
        /// The bit position reached.
        at: u64,
    },
    /// A resource descriptor that cannot be encoded.
    #[error("resource descriptor: {0}")]
    Resource(&'static str),
}

/// A NameString as ASL writes it: `\_SB_.PCI0`, `^^FOO`, `_S5` (short segments are padded
/// with `_`).
pub type Name = String;

/// Region spaces of an `OperationRegion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionSpace {
    /// Physical memory.
    SystemMemory = 0,
    /// I/O ports.
    SystemIo = 1,
    /// PCI configuration space of the device the region is in.
    PciConfig = 2,
}

/// How a `Field` accesses its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessType {
    /// Any width.
    Any = 0,
    /// Bytes.
    Byte = 1,
    /// 16-bit words.
    Word = 2,
    /// 32-bit double words.
    DWord = 3,
    /// 64-bit quad words.
    QWord = 4,
    /// Buffers.
    Buffer = 5,
}

/// What a `Field` write does with the bits of the access unit outside the field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateRule {
    /// Read them and write them back.
    Preserve = 0,
    /// Write ones.
    WriteAsOnes = 1,
    /// Write zeros.
    WriteAsZeros = 2,
}

/// One entry of a `Field` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldEntry {
    /// A field unit: a NameSeg and its width in bits.
    Named(Name, u32),
    /// Unnamed bits skipped.
    Reserved(u32),
    /// Skip to this byte offset of the region (ASL `Offset (n)`).
    Offset(u32),
}

/// Binary arithmetic and bit operations: `Op (a, b, target)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// a + b
    Add = 0x72,
    /// a * b
    Multiply = 0x77,
    /// a - b
    Subtract = 0x74,
    /// a << b
    ShiftLeft = 0x79,
    /// a >> b
    ShiftRight = 0x7a,
    /// a & b
    And = 0x7b,
    /// a | b
    Or = 0x7d,
    /// a ^ b
    Xor = 0x7f,
}

/// Logical comparisons and connectives; each yields Ones (true) or Zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogicOp {
    /// a && b
    LAnd = 0x90,
    /// a || b
    LOr = 0x91,
    /// a == b
    LEqual = 0x93,
    /// a > b
    LGreater = 0x94,
    /// a < b
    LLess = 0x95,
}

/// Widths of `CreateXxxField`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldWidth {
    /// CreateByteField.
    Byte = 0x8c,
    /// CreateWordField.
    Word = 0x8b,
    /// CreateDWordField.
    DWord = 0x8a,
    /// CreateQWordField.
    QWord = 0x8f,
}

/// Where a result goes (AML's SuperName / Target).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Nowhere (NullName).
    Null,
    /// Local0-7.
    Local(u8),
    /// Arg0-6.
    Arg(u8),
    /// A named object.
    Path(Name),
    /// The debug object.
    Debug,
    /// An element of a package, buffer or string: `Index (source, index)`.
    Index(Box<Expr>, Box<Expr>),
}

/// A value (AML's TermArg / DataObject).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    /// An integer, encoded in the smallest form.
    Int(u64),
    /// A string.
    Str(String),
    /// A buffer holding these bytes.
    Buffer(Vec<u8>),
    /// A package of data objects or names.
    Package(Vec<Expr>),
    /// A compressed EISA id such as `PNP0303`.
    EisaId(String),
    /// A buffer of resource descriptors closed by an end tag.
    ResourceTemplate(Vec<Resource>),
    /// Local0-7.
    Local(u8),
    /// Arg0-6.
    Arg(u8),
    /// A named object's value.
    Path(Name),
    /// A call of a method with its arguments.
    Call(Name, Vec<Expr>),
    /// An arithmetic or bit operation.
    Binary(BinaryOp, Box<Expr>, Box<Expr>, Target),
    /// A logical operation.
    Logic(LogicOp, Box<Expr>, Box<Expr>),
    /// Logical not.
    LNot(Box<Expr>),
    /// Increments a variable in place and yields the new value.
    Increment(Target),
    /// Decrements a variable in place and yields the new value.
    Decrement(Target),
    /// Stores a value and yields it.
    Store(Box<Expr>, Target),
    /// Size of a buffer, string or package.
    SizeOf(Target),
    /// The object a reference points at.
    DerefOf(Box<Expr>),
    /// A reference to an element: `Index (source, index, target)`.
    Index(Box<Expr>, Box<Expr>, Target),
    /// Conversion to a buffer.
    ToBuffer(Box<Expr>, Target),
    /// Takes a mutex, waiting up to the timeout in ms (0xffff: forever); yields true when the
    /// wait timed out.
    Acquire(Name, u16),
}

/// A statement or named object (AML's TermObj).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    /// Opens an existing scope.
    Scope(Name, Vec<Term>),
    /// A device and what it holds.
    Device(Name, Vec<Term>),
    /// A named data object.
    Name(Name, Expr),
    /// A control method.
    Method {
        /// Its name.
        name: Name,
        /// How many arguments it takes (0-7).
        args: u8,
        /// Whether calls are serialized.
        serialized: bool,
        /// Its sync level (0-15).
        sync_level: u8,
        /// Its statements.
        body: Vec<Term>,
    },
    /// An operation region.
    OpRegion {
        /// Its name.
        name: Name,
        /// Its address space.
        space: RegionSpace,
        /// Its start.
        offset: Expr,
        /// Its length in bytes.
        len: Expr,
    },
    /// Field units over a region.
    Field {
        /// The region.
        region: Name,
        /// The access width.
        access: AccessType,
        /// Whether accesses take the global lock.
        lock: bool,
        /// What happens to the other bits of an access unit.
        update: UpdateRule,
        /// The field list.
        entries: Vec<FieldEntry>,
    },
    /// A mutex and its sync level (0-15).
    Mutex(Name, u8),
    /// A field over bytes of a buffer: `CreateXxxField (buffer, byte index, name)`.
    CreateField(FieldWidth, Expr, Expr, Name),
    /// Stores a value.
    Store(Expr, Target),
    /// Returns a value.
    Return(Expr),
    /// A conditional; the else branch is emitted when present.
    If(Expr, Vec<Term>, Option<Vec<Term>>),
    /// A loop.
    While(Expr, Vec<Term>),
    /// Sends a notification value to a device.
    Notify(Target, Expr),
    /// Releases a mutex.
    Release(Name),
    /// An expression evaluated for its effect (a method call, an operation with a target).
    Eval(Expr),
}

/// Whether a resource is used by the device or handed to its children.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// The device decodes it for its children (a bridge window).
    Producer,
    /// The device uses it.
    Consumer,
}

/// Cacheability of a memory range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cacheable {
    /// Not cacheable.
    NonCacheable = 0,
    /// Cacheable.
    Cacheable = 1,
    /// Write-combining.
    WriteCombining = 2,
    /// Prefetchable.
    Prefetchable = 3,
}

/// An address-space descriptor's range: fixed minimum and maximum, positive decode, no
/// granularity; the length is `max - min + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRange<T> {
    /// Producer or consumer.
    pub usage: Usage,
    /// First address.
    pub min: T,
    /// Last address.
    pub max: T,
    /// Offset from the secondary to the primary side of a bridge.
    pub translation: T,
}

/// A resource descriptor of a `ResourceTemplate`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    /// `IO (Decode16, min, max, alignment, length)`.
    Io {
        /// Lowest base address.
        min: u16,
        /// Highest base address.
        max: u16,
        /// Base alignment.
        align: u8,
        /// Number of ports.
        len: u8,
    },
    /// `IRQNoFlags () { irqs }`: ISA IRQs 0-15, edge, active high.
    IrqNoFlags(Vec<u8>),
    /// `Interrupt (usage, level/edge, polarity, sharing) { gsis }`.
    Interrupt {
        /// Producer or consumer.
        usage: Usage,
        /// Edge- (true) or level-triggered.
        edge: bool,
        /// Active low (true) or high.
        active_low: bool,
        /// Shared with other devices.
        shared: bool,
        /// The interrupts (1-255 of them).
        irqs: Vec<u32>,
    },
    /// `Memory32Fixed (rw, base, length)`.
    Memory32Fixed {
        /// Writeable (true) or read-only.
        writeable: bool,
        /// Base address.
        base: u32,
        /// Length in bytes.
        len: u32,
    },
    /// `DWordMemory (...)`.
    DWordMemory {
        /// The range.
        range: AddressRange<u32>,
        /// Its cacheability.
        cacheable: Cacheable,
        /// Writeable (true) or read-only.
        writeable: bool,
    },
    /// `QWordMemory (...)`.
    QWordMemory {
        /// The range.
        range: AddressRange<u64>,
        /// Its cacheability.
        cacheable: Cacheable,
        /// Writeable (true) or read-only.
        writeable: bool,
    },
    /// `WordBusNumber (...)`.
    WordBusNumber(AddressRange<u16>),
    /// `WordIO (..., EntireRange)`.
    WordIo(AddressRange<u16>),
}

/// Encodes a list of terms (the body of a definition block).
pub fn to_aml(terms: &[Term]) -> Result<Vec<u8>, AmlError> {
    let mut out = Vec::new();
    for t in terms {
        t.encode(&mut out)?;
    }
    Ok(out)
}

// ---- Constructors for the common cases ----

impl Term {
    /// `Scope (path) { terms }`.
    pub fn scope(path: &str, terms: Vec<Term>) -> Term {
        Term::Scope(path.into(), terms)
    }

    /// `Device (name) { terms }`.
    pub fn device(name: &str, terms: Vec<Term>) -> Term {
        Term::Device(name.into(), terms)
    }

    /// `Name (name, value)`.
    pub fn name(name: &str, value: Expr) -> Term {
        Term::Name(name.into(), value)
    }

    /// A not-serialized method at sync level 0.
    pub fn method(name: &str, args: u8, body: Vec<Term>) -> Term {
        Term::Method {
            name: name.into(),
            args,
            serialized: false,
            sync_level: 0,
            body,
        }
    }

    /// A serialized method at sync level 0.
    pub fn serialized_method(name: &str, args: u8, body: Vec<Term>) -> Term {
        Term::Method {
            name: name.into(),
            args,
            serialized: true,
            sync_level: 0,
            body,
        }
    }

    /// `Return (value)`.
    pub fn ret(value: Expr) -> Term {
        Term::Return(value)
    }

    /// `If (cond) { then }`.
    pub fn if_then(cond: Expr, then: Vec<Term>) -> Term {
        Term::If(cond, then, None)
    }

    /// `If (cond) { then } Else { otherwise }`.
    pub fn if_else(cond: Expr, then: Vec<Term>, otherwise: Vec<Term>) -> Term {
        Term::If(cond, then, Some(otherwise))
    }

    /// `Store (value, target)`.
    pub fn store(value: Expr, target: Target) -> Term {
        Term::Store(value, target)
    }
}

impl Expr {
    /// A string.
    pub fn string(s: &str) -> Expr {
        Expr::Str(s.into())
    }

    /// A named object.
    pub fn path(p: &str) -> Expr {
        Expr::Path(p.into())
    }

    /// `EisaId ("PNP0303")`.
    pub fn eisa_id(id: &str) -> Expr {
        Expr::EisaId(id.into())
    }

    /// A method call.
    pub fn call(method: &str, args: Vec<Expr>) -> Expr {
        Expr::Call(method.into(), args)
    }

    /// `op (a, b, target)`.
    pub fn binary(op: BinaryOp, a: Expr, b: Expr, target: Target) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b), target)
    }

    /// `op (a, b)`.
    pub fn logic(op: LogicOp, a: Expr, b: Expr) -> Expr {
        Expr::Logic(op, Box::new(a), Box::new(b))
    }

    /// `LNot (a)`.
    pub fn lnot(a: Expr) -> Expr {
        Expr::LNot(Box::new(a))
    }
}

impl From<u64> for Expr {
    fn from(v: u64) -> Expr {
        Expr::Int(v)
    }
}

impl Resource {
    /// `IO (Decode16, port, port, 1, len)`: a fixed block of ports.
    pub fn io_fixed(port: u16, len: u8) -> Resource {
        Resource::Io {
            min: port,
            max: port,
            align: 1,
            len,
        }
    }
}

// ---- Encoding ----

const EXT_OP: u8 = 0x5b;
const NAME_OP: u8 = 0x08;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const VAR_PACKAGE_OP: u8 = 0x13;
const METHOD_OP: u8 = 0x14;
const LOCAL0_OP: u8 = 0x60;
const ARG0_OP: u8 = 0x68;
const STORE_OP: u8 = 0x70;
const INCREMENT_OP: u8 = 0x75;
const DECREMENT_OP: u8 = 0x76;
const DEREF_OF_OP: u8 = 0x83;
const NOTIFY_OP: u8 = 0x86;
const SIZE_OF_OP: u8 = 0x87;
const INDEX_OP: u8 = 0x88;
const LNOT_OP: u8 = 0x92;
const TO_BUFFER_OP: u8 = 0x96;
const IF_OP: u8 = 0xa0;
const ELSE_OP: u8 = 0xa1;
const WHILE_OP: u8 = 0xa2;
const RETURN_OP: u8 = 0xa4;
const MUTEX_OP: u8 = 0x01;
const ACQUIRE_OP: u8 = 0x23;
const RELEASE_OP: u8 = 0x27;
const DEBUG_OP: u8 = 0x31;
const OP_REGION_OP: u8 = 0x80;
const FIELD_OP: u8 = 0x81;
const DEVICE_OP: u8 = 0x82;
const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const ONES_OP: u8 = 0xff;
const BYTE_PREFIX: u8 = 0x0a;
const WORD_PREFIX: u8 = 0x0b;
const DWORD_PREFIX: u8 = 0x0c;
const STRING_PREFIX: u8 = 0x0d;
const QWORD_PREFIX: u8 = 0x0e;
const ROOT_CHAR: u8 = b'\\';
const PARENT_PREFIX: u8 = b'^';
const DUAL_NAME_PREFIX: u8 = 0x2e;
const MULTI_NAME_PREFIX: u8 = 0x2f;
const NULL_NAME: u8 = 0x00;

/// The largest value a PkgLength holds (28 bits).
const PKG_LENGTH_MAX: usize = (1 << 28) - 1;

/// Encodes `value` in PkgLength form: one byte up to 63, else a lead byte holding the byte
/// count and the low nibble followed by 1-3 more bytes.
fn pkg_length_value(value: usize, out: &mut Vec<u8>) -> Result<(), AmlError> {
    if value <= 0x3f {
        out.push(value as u8);
        return Ok(());
    }
    let extra = match value {
        0..=0xfff => 1,
        0x1000..=0xf_ffff => 2,
        0x10_0000..=PKG_LENGTH_MAX => 3,
        _ => return Err(AmlError::TooLong(value)),
    };
    out.push(((extra as u8) << 6) | (value & 0xf) as u8);
    for i in 0..extra {
        out.push((value >> (4 + 8 * i)) as u8);
    }
    Ok(())
}

/// The PkgLength of an object whose contents after the PkgLength are `len` bytes: the
/// encoded value counts the PkgLength's own bytes too.
fn pkg_length(len: usize, out: &mut Vec<u8>) -> Result<(), AmlError> {
    let total = if len < 0x3f {
        len + 1
    } else if len + 2 <= 0xfff {
        len + 2
    } else if len + 3 <= 0xf_ffff {
        len + 3
    } else {
        len.checked_add(4).ok_or(AmlError::TooLong(len))?
    };
    pkg_length_value(total, out)
}

/// `op PkgLength contents`, the contents built by `body`.
fn with_pkg(
    out: &mut Vec<u8>,
    op: &[u8],
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), AmlError>,
) -> Result<(), AmlError> {
    let mut inner = Vec::new();
    body(&mut inner)?;
    out.extend_from_slice(op);
    pkg_length(inner.len(), out)?;
    out.extend_from_slice(&inner);
    Ok(())
}

fn name_seg(seg: &str, whole: &str) -> Result<[u8; 4], AmlError> {
    let bytes = seg.as_bytes();
    let lead_ok = bytes
        .first()
        .is_some_and(|c| c.is_ascii_uppercase() || *c == b'_');
    let rest_ok = bytes
        .iter()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
    if !lead_ok || !rest_ok || bytes.len() > 4 {
        return Err(AmlError::Name(whole.into()));
    }
    let mut s = [b'_'; 4];
    s[..bytes.len()].copy_from_slice(bytes);
    Ok(s)
}

/// Encodes a NameString: prefixes, then a NameSeg, DualNamePath, MultiNamePath or NullName.
fn name_string(name: &str, out: &mut Vec<u8>) -> Result<(), AmlError> {
    let mut rest = name;
    if let Some(r) = rest.strip_prefix('\\') {
        out.push(ROOT_CHAR);
        rest = r;
    } else {
        while let Some(r) = rest.strip_prefix('^') {
            out.push(PARENT_PREFIX);
            rest = r;
        }
    }
    if rest.is_empty() {
        if name.is_empty() {
            return Err(AmlError::Name(name.into()));
        }
        out.push(NULL_NAME);
        return Ok(());
    }
    let segs = rest
        .split('.')
        .map(|s| name_seg(s, name))
        .collect::<Result<Vec<_>, _>>()?;
    match segs.len() {
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n @ 3..=255 => out.extend_from_slice(&[MULTI_NAME_PREFIX, n as u8]),
        _ => return Err(AmlError::Name(name.into())),
    }
    segs.iter().for_each(|s| out.extend_from_slice(s));
    Ok(())
}

fn integer(v: u64, out: &mut Vec<u8>) {
    match v {
        0 => out.push(ZERO_OP),
        1 => out.push(ONE_OP),
        u64::MAX => out.push(ONES_OP),
        2..=0xff => out.extend_from_slice(&[BYTE_PREFIX, v as u8]),
        0x100..=0xffff => {
            out.push(WORD_PREFIX);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(DWORD_PREFIX);
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        _ => {
            out.push(QWORD_PREFIX);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) -> Result<(), AmlError> {
    if !s.bytes().all(|b| (0x01..=0x7f).contains(&b)) {
        return Err(AmlError::String(s.into()));
    }
    out.push(STRING_PREFIX);
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    Ok(())
}

fn buffer(bytes: &[u8], out: &mut Vec<u8>) -> Result<(), AmlError> {
    with_pkg(out, &[BUFFER_OP], |b| {
        integer(bytes.len() as u64, b);
        b.extend_from_slice(bytes);
        Ok(())
    })
}

/// The 32-bit value of an EISA id: three letters of 5 bits, four hex digits, stored
/// big-endian (so "PNP0303" reads 0x0303d041).
fn eisa_id(id: &str) -> Result<u32, AmlError> {
    let b = id.as_bytes();
    let bad = || AmlError::EisaId(id.into());
    if b.len() != 7 || !b[..3].iter().all(u8::is_ascii_uppercase) {
        return Err(bad());
    }
    let hex = std::str::from_utf8(&b[3..]).map_err(|_| bad())?;
    if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let product = u32::from_str_radix(hex, 16).map_err(|_| bad())?;
    let vendor = b[..3]
        .iter()
        .fold(0u32, |acc, c| (acc << 5) | u32::from(c - 0x40));
    Ok(((vendor << 16) | product).swap_bytes())
}

fn local(n: u8) -> Result<u8, AmlError> {
    (n <= 7).then_some(LOCAL0_OP + n).ok_or(AmlError::Local(n))
}

fn arg(n: u8) -> Result<u8, AmlError> {
    (n <= 6).then_some(ARG0_OP + n).ok_or(AmlError::Arg(n))
}

impl Target {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), AmlError> {
        match self {
            Target::Null => out.push(NULL_NAME),
            Target::Local(n) => out.push(local(*n)?),
            Target::Arg(n) => out.push(arg(*n)?),
            Target::Path(p) => name_string(p, out)?,
            Target::Debug => out.extend_from_slice(&[EXT_OP, DEBUG_OP]),
            Target::Index(src, idx) => {
                out.push(INDEX_OP);
                src.encode(out)?;
                idx.encode(out)?;
                out.push(NULL_NAME);
            }
        }
        Ok(())
    }
}

impl Expr {
    /// Whether this is a data object (what `Name` and packages may hold).
    fn is_data(&self) -> bool {
        matches!(
            self,
            Expr::Int(_)
                | Expr::Str(_)
                | Expr::Buffer(_)
                | Expr::Package(_)
                | Expr::EisaId(_)
                | Expr::ResourceTemplate(_)
        )
    }

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), AmlError> {
        match self {
            Expr::Int(v) => integer(*v, out),
            Expr::Str(s) => string(s, out)?,
            Expr::Buffer(b) => buffer(b, out)?,
            Expr::Package(elems) => package(elems, out)?,
            Expr::EisaId(id) => {
                out.push(DWORD_PREFIX);
                out.extend_from_slice(&eisa_id(id)?.to_le_bytes());
            }
            Expr::ResourceTemplate(res) => buffer(&resource_template(res)?, out)?,
            Expr::Local(n) => out.push(local(*n)?),
            Expr::Arg(n) => out.push(arg(*n)?),
            Expr::Path(p) => name_string(p, out)?,
            Expr::Call(m, args) => {
                name_string(m, out)?;
                args.iter().try_for_each(|a| a.encode(out))?;
            }
            Expr::Binary(op, a, b, t) => operator(out, &[*op as u8], &[a, b], Some(t))?,
            Expr::Logic(op, a, b) => operator(out, &[*op as u8], &[a, b], None)?,
            Expr::LNot(a) => operator(out, &[LNOT_OP], &[a], None)?,
            Expr::Increment(t) => operator(out, &[INCREMENT_OP], &[], Some(t))?,
            Expr::Decrement(t) => operator(out, &[DECREMENT_OP], &[], Some(t))?,
            Expr::Store(v, t) => operator(out, &[STORE_OP], &[v], Some(t))?,
            Expr::SizeOf(t) => operator(out, &[SIZE_OF_OP], &[], Some(t))?,
            Expr::DerefOf(a) => operator(out, &[DEREF_OF_OP], &[a], None)?,
            Expr::Index(src, i, t) => operator(out, &[INDEX_OP], &[src, i], Some(t))?,
            Expr::ToBuffer(a, t) => operator(out, &[TO_BUFFER_OP], &[a], Some(t))?,
            Expr::Acquire(m, timeout) => {
                out.extend_from_slice(&[EXT_OP, ACQUIRE_OP]);
                name_string(m, out)?;
                out.extend_from_slice(&timeout.to_le_bytes());
            }
        }
        Ok(())
    }
}

/// `op operands... [target]`.
fn operator(
    out: &mut Vec<u8>,
    op: &[u8],
    operands: &[&Expr],
    target: Option<&Target>,
) -> Result<(), AmlError> {
    out.extend_from_slice(op);
    operands.iter().try_for_each(|a| a.encode(out))?;
    target.map_or(Ok(()), |t| t.encode(out))
}

fn package(elems: &[Expr], out: &mut Vec<u8>) -> Result<(), AmlError> {
    let count = elems.len();
    let op = if count <= 0xff {
        PACKAGE_OP
    } else {
        VAR_PACKAGE_OP
    };
    with_pkg(out, &[op], |b| {
        if count <= 0xff {
            b.push(count as u8);
        } else {
            integer(count as u64, b);
        }
        for e in elems {
            if !e.is_data() && !matches!(e, Expr::Path(_)) {
                return Err(AmlError::NotData("package element"));
            }
            e.encode(b)?;
        }
        Ok(())
    })
}

/// `op PkgLength name terms`: Scope, Device.
fn named_block(out: &mut Vec<u8>, op: &[u8], name: &str, terms: &[Term]) -> Result<(), AmlError> {
    with_pkg(out, op, |b| {
        name_string(name, b)?;
        terms.iter().try_for_each(|t| t.encode(b))
    })
}

/// `op PkgLength [predicate] terms`: If, Else, While.
fn block(
    out: &mut Vec<u8>,
    op: u8,
    predicate: Option<&Expr>,
    terms: &[Term],
) -> Result<(), AmlError> {
    with_pkg(out, &[op], |b| {
        predicate.map_or(Ok(()), |p| p.encode(b))?;
        terms.iter().try_for_each(|t| t.encode(b))
    })
}

impl Term {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), AmlError> {
        match self {
            Term::Scope(name, terms) => named_block(out, &[SCOPE_OP], name, terms)?,
            Term::Device(name, terms) => named_block(out, &[EXT_OP, DEVICE_OP], name, terms)?,
            Term::Name(name, value) => {
                if !value.is_data() {
                    return Err(AmlError::NotData("the value of Name"));
                }
                out.push(NAME_OP);
                name_string(name, out)?;
                value.encode(out)?;
            }
            Term::Method { .. } => self.encode_method(out)?,
            Term::OpRegion {
                name,
                space,
                offset,
                len,
            } => {
                out.extend_from_slice(&[EXT_OP, OP_REGION_OP]);
                name_string(name, out)?;
                out.push(*space as u8);
                offset.encode(out)?;
                len.encode(out)?;
            }
            Term::Field { .. } => self.encode_field(out)?,
            Term::Mutex(name, level) => {
                if *level > 15 {
                    return Err(AmlError::SyncLevel(name.clone()));
                }
                out.extend_from_slice(&[EXT_OP, MUTEX_OP]);
                name_string(name, out)?;
                out.push(*level);
            }
            Term::CreateField(width, src, index, name) => {
                operator(out, &[*width as u8], &[src, index], None)?;
                name_string(name, out)?;
            }
            Term::Store(v, t) => operator(out, &[STORE_OP], &[v], Some(t))?,
            Term::Return(v) => operator(out, &[RETURN_OP], &[v], None)?,
            Term::If(cond, then, otherwise) => {
                block(out, IF_OP, Some(cond), then)?;
                if let Some(terms) = otherwise {
                    block(out, ELSE_OP, None, terms)?;
                }
            }
            Term::While(cond, body) => block(out, WHILE_OP, Some(cond), body)?,
            Term::Notify(obj, value) => {
                out.push(NOTIFY_OP);
                obj.encode(out)?;
                value.encode(out)?;
            }
            Term::Release(m) => {
                out.extend_from_slice(&[EXT_OP, RELEASE_OP]);
                name_string(m, out)?;
            }
            Term::Eval(e) => e.encode(out)?,
        }
        Ok(())
    }

    fn encode_method(&self, out: &mut Vec<u8>) -> Result<(), AmlError> {
        let Term::Method {
            name,
            args,
            serialized,
            sync_level,
            body,
        } = self
        else {
            return Ok(());
        };
        if *args > 7 || *sync_level > 15 {
            return Err(AmlError::Method {
                name: name.clone(),
                args: *args,
                sync_level: *sync_level,
            });
        }
        let flags = args | (u8::from(*serialized) << 3) | (sync_level << 4);
        with_pkg(out, &[METHOD_OP], |b| {
            name_string(name, b)?;
            b.push(flags);
            body.iter().try_for_each(|t| t.encode(b))
        })
    }

    fn encode_field(&self, out: &mut Vec<u8>) -> Result<(), AmlError> {
        let Term::Field {
            region,
            access,
            lock,
            update,
            entries,
        } = self
        else {
            return Ok(());
        };
        let flags = (*access as u8) | (u8::from(*lock) << 4) | ((*update as u8) << 5);
        with_pkg(out, &[EXT_OP, FIELD_OP], |b| {
            name_string(region, b)?;
            b.push(flags);
            field_list(entries, b)
        })
    }
}

/// Field units: a NameSeg and its bit width, or 0x00 and the bits skipped, each width in
/// PkgLength form (the width itself, not counting its own bytes).
fn field_list(entries: &[FieldEntry], out: &mut Vec<u8>) -> Result<(), AmlError> {
    let mut at = 0u64;
    for e in entries {
        let bits = match e {
            FieldEntry::Named(n, bits) => {
                out.extend_from_slice(&name_seg(n, n).map_err(|_| AmlError::NameSeg(n.clone()))?);
                u64::from(*bits)
            }
            FieldEntry::Reserved(bits) => {
                out.push(0x00);
                u64::from(*bits)
            }
            FieldEntry::Offset(offset) => {
                let to = u64::from(*offset) * 8;
                if to < at {
                    return Err(AmlError::FieldOffset {
                        offset: *offset,
                        at,
                    });
                }
                if to == at {
                    continue;
                }
                out.push(0x00);
                to - at
            }
        };
        let bits_usize = usize::try_from(bits).map_err(|_| AmlError::TooLong(usize::MAX))?;
        pkg_length_value(bits_usize, out)?;
        at += bits;
    }
    Ok(())
}

// ---- Resource descriptors (ACPI 6.4, 6.4.2 small and 6.4.3 large) ----

const IO_DESC: u8 = 0x47;
const IRQ_NO_FLAGS_DESC: u8 = 0x22;
const END_TAG_DESC: u8 = 0x79;
const MEMORY32_FIXED_DESC: u8 = 0x86;
const DWORD_ADDRESS_DESC: u8 = 0x87;
const WORD_ADDRESS_DESC: u8 = 0x88;
const EXTENDED_IRQ_DESC: u8 = 0x89;
const QWORD_ADDRESS_DESC: u8 = 0x8a;
const SPACE_MEMORY: u8 = 0;
const SPACE_IO: u8 = 1;
const SPACE_BUS: u8 = 2;
/// I/O type-specific flags: the range covers ISA and non-ISA ports.
const IO_ENTIRE_RANGE: u8 = 0x03;

fn large(tag: u8, data: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    out.extend_from_slice(&(data.len() as u16).to_le_bytes());
    out.extend_from_slice(data);
}

/// The length of a range, which must not be empty or wrap.
trait RangeInt: Copy + fmt::Debug {
    fn len_of(min: Self, max: Self) -> Option<Self>;
    fn put(self, out: &mut Vec<u8>);
}

macro_rules! range_int {
    ($t:ty) => {
        impl RangeInt for $t {
            fn len_of(min: Self, max: Self) -> Option<Self> {
                max.checked_sub(min)?.checked_add(1)
            }
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    };
}
range_int!(u16);
range_int!(u32);
range_int!(u64);

/// Address space descriptor body: type, general flags, type flags, then granularity, min,
/// max, translation and length.
fn address_space<T: RangeInt + Default>(
    space: u8,
    type_flags: u8,
    r: &AddressRange<T>,
) -> Result<Vec<u8>, AmlError> {
    let len = T::len_of(r.min, r.max).ok_or(AmlError::Resource("empty or wrapping range"))?;
    // MinFixed, MaxFixed, positive decode; bit 0 set for a consumer.
    let general = 0x0c | u8::from(r.usage == Usage::Consumer);
    let mut d = vec![space, general, type_flags];
    for v in [T::default(), r.min, r.max, r.translation, len] {
        v.put(&mut d);
    }
    Ok(d)
}

impl Resource {
    fn encode(&self, out: &mut Vec<u8>) -> Result<(), AmlError> {
        let mem_flags = |c: &Cacheable, w: &bool| u8::from(*w) | ((*c as u8) << 1);
        match self {
            Resource::Io {
                min,
                max,
                align,
                len,
            } => {
                out.extend_from_slice(&[IO_DESC, 0x01]); // 16-bit decode
                out.extend_from_slice(&min.to_le_bytes());
                out.extend_from_slice(&max.to_le_bytes());
                out.extend_from_slice(&[*align, *len]);
            }
            Resource::IrqNoFlags(irqs) => irq_no_flags(irqs, out)?,
            Resource::Interrupt { .. } => self.encode_interrupt(out)?,
            Resource::Memory32Fixed {
                writeable,
                base,
                len,
            } => {
                let mut d = vec![u8::from(*writeable)];
                d.extend_from_slice(&base.to_le_bytes());
                d.extend_from_slice(&len.to_le_bytes());
                large(MEMORY32_FIXED_DESC, &d, out);
            }
            Resource::DWordMemory {
                range,
                cacheable,
                writeable,
            } => {
                let d = address_space(SPACE_MEMORY, mem_flags(cacheable, writeable), range)?;
                large(DWORD_ADDRESS_DESC, &d, out);
            }
            Resource::QWordMemory {
                range,
                cacheable,
                writeable,
            } => {
                let d = address_space(SPACE_MEMORY, mem_flags(cacheable, writeable), range)?;
                large(QWORD_ADDRESS_DESC, &d, out);
            }
            Resource::WordBusNumber(range) => {
                large(WORD_ADDRESS_DESC, &address_space(SPACE_BUS, 0, range)?, out)
            }
            Resource::WordIo(range) => {
                let d = address_space(SPACE_IO, IO_ENTIRE_RANGE, range)?;
                large(WORD_ADDRESS_DESC, &d, out);
            }
        }
        Ok(())
    }

    fn encode_interrupt(&self, out: &mut Vec<u8>) -> Result<(), AmlError> {
        let Resource::Interrupt {
            usage,
            edge,
            active_low,
            shared,
            irqs,
        } = self
        else {
            return Ok(());
        };
        let count = u8::try_from(irqs.len())
            .ok()
            .filter(|c| *c > 0)
            .ok_or(AmlError::Resource("Interrupt takes 1-255 interrupts"))?;
        let flags = u8::from(*usage == Usage::Consumer)
            | (u8::from(*edge) << 1)
            | (u8::from(*active_low) << 2)
            | (u8::from(*shared) << 3);
        let mut d = vec![flags, count];
        irqs.iter()
            .for_each(|i| d.extend_from_slice(&i.to_le_bytes()));
        large(EXTENDED_IRQ_DESC, &d, out);
        Ok(())
    }
}

fn irq_no_flags(irqs: &[u8], out: &mut Vec<u8>) -> Result<(), AmlError> {
    let mut mask = 0u16;
    for &irq in irqs {
        if irq > 15 {
            return Err(AmlError::Resource("IRQNoFlags takes IRQs 0-15"));
        }
        mask |= 1 << irq;
    }
    out.push(IRQ_NO_FLAGS_DESC);
    out.extend_from_slice(&mask.to_le_bytes());
    Ok(())
}

/// The descriptors, then an end tag whose checksum byte makes the template sum to zero.
fn resource_template(res: &[Resource]) -> Result<Vec<u8>, AmlError> {
    let mut out = Vec::new();
    for r in res {
        r.encode(&mut out)?;
    }
    out.push(END_TAG_DESC);
    let sum = out.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    out.push(0u8.wrapping_sub(sum));
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests;
