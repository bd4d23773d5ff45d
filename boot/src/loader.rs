//! Loading a kernel (ELF `vmlinux` or `bzImage`) and an initrd, and writing what the kernel
//! reads at entry: the zero page (Linux boot protocol) or `hvm_start_info` (PVH), each with
//! the e820 memory map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use crate::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::x86_64::regs::EntryPoint;

/// Errors of kernel, initrd and command-line loading.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// Neither ELF nor bzImage.
    #[error("not a kernel image: expected an ELF vmlinux or a bzImage")]
    UnknownFormat,
    /// Reading the image file failed.
    #[error("cannot read the kernel image")]
    Read(#[source] std::io::Error),
    /// A malformed ELF header or program header table.
    #[error("malformed ELF kernel: {0}")]
    BadElf(&'static str),
    /// A bzImage that cannot be entered in 64-bit mode.
    #[error("bzImage boot protocol {major}.{minor:02} has no 64-bit entry point (2.12+ needed)")]
    NoLongModeEntry {
        /// Protocol major version.
        major: u16,
        /// Protocol minor version.
        minor: u16,
    },
    /// The kernel does not fit in guest memory.
    #[error(
        "guest memory ({mem_mib} MiB) is too small for this kernel, which needs {need_mib} MiB"
    )]
    KernelTooBig {
        /// RAM below the MMIO gap.
        mem_mib: u64,
        /// What the kernel needs.
        need_mib: u64,
    },
    /// The initrd does not fit between the kernel and the end of memory.
    #[error(
        "guest memory ({mem_mib} MiB) is too small for the kernel and a {initrd_kib} KiB initrd"
    )]
    InitrdTooBig {
        /// RAM below the MMIO gap.
        mem_mib: u64,
        /// Size of the initrd.
        initrd_kib: u64,
    },
    /// linux-loader rejected the image.
    #[error("cannot load the kernel image")]
    Load(#[source] linux_loader::loader::Error),
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit.
        max: usize,
    },
    /// The command line holds a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// A write to guest memory failed.
    #[error("cannot write {0} into guest memory")]
    Write(&'static str),
}

/// What the rest of the boot needs to know about a loaded kernel.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// How to enter it.
    pub entry: EntryPoint,
    /// First byte above everything the kernel occupies while booting.
    pub end: u64,
    /// The bzImage setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
    /// Longest command line accepted, NUL excluded.
    pub cmdline_max: usize,
    /// Highest address the initrd may end at (+1).
    pub initrd_limit: u64,
}

/// An initrd placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const HDRS_MAGIC: u32 = 0x5372_6448;
const XLF_KERNEL_64: u16 = 1;
const MAX_ELF_PHDRS: u16 = 128;

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> Result<(), LoaderError> {
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(buf))
        .map_err(LoaderError::Read)
}

/// Highest `p_paddr + p_memsz` over the ELF's loadable segments.
fn elf_end(file: &mut File) -> Result<u64, LoaderError> {
    let mut eh = [0u8; 64];
    read_at(file, 0, &mut eh).map_err(|_| LoaderError::BadElf("truncated header"))?;
    if eh[4] != 2 || eh[5] != 1 {
        return Err(LoaderError::BadElf("not a little-endian 64-bit ELF"));
    }
    let phoff = u64::from_le_bytes(eh[0x20..0x28].try_into().unwrap_or_default());
    let phentsize = u16::from_le_bytes([eh[0x36], eh[0x37]]);
    let phnum = u16::from_le_bytes([eh[0x38], eh[0x39]]);
    if phentsize != 56 || phnum == 0 || phnum > MAX_ELF_PHDRS {
        return Err(LoaderError::BadElf("bad program header table"));
    }
    let mut end = 0u64;
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        read_at(file, phoff.saturating_add(i * 56), &mut ph)
            .map_err(|_| LoaderError::BadElf("truncated program header"))?;
        let field = |o: usize| u64::from_le_bytes(ph[o..o + 8].try_into().unwrap_or_default());
        if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 1 {
            let seg_end = field(24)
                .checked_add(field(40))
                .ok_or(LoaderError::BadElf("segment address overflows"))?;
            end = end.max(seg_end);
        }
    }
    Ok(end)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Loads the kernel in `file` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, file: &mut File) -> Result<LoadedKernel, LoaderError> {
    let ram_end = low_ram_end(mem_size(mem));
    let mut magic = [0u8; 4];
    read_at(file, 0, &mut magic).map_err(|_| LoaderError::UnknownFormat)?;
    if &magic == ELF_MAGIC {
        let end = elf_end(file)?;
        if end > ram_end {
            return Err(LoaderError::KernelTooBig {
                mem_mib: mib(ram_end),
                need_mib: mib(end),
            });
        }
        let res = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
            .map_err(LoaderError::Load)?;
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.0),
            _ => EntryPoint::Linux64(res.kernel_load.0),
        };
        return Ok(LoadedKernel {
            entry,
            end,
            setup_header: None,
            cmdline_max: CMDLINE_MAX_SIZE - 1,
            initrd_limit: ram_end,
        });
    }
    let mut raw = [0u8; std::mem::size_of::<setup_header>()];
    read_at(file, 0x1f1, &mut raw).map_err(|_| LoaderError::UnknownFormat)?;
    // SAFETY: setup_header is a plain-old-data struct of integers, valid for any bytes, and
    // `raw` has exactly its size.
    let hdr: setup_header = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let (header, version) = (hdr.header, hdr.version);
    if header != HDRS_MAGIC {
        return Err(LoaderError::UnknownFormat);
    }
    let xloadflags = hdr.xloadflags;
    if version < 0x20c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoaderError::NoLongModeEntry {
            major: version >> 8,
            minor: version & 0xff,
        });
    }
    let (code32_start, init_size, pref) = (hdr.code32_start, hdr.init_size, hdr.pref_address);
    let need = u64::from(code32_start).max(pref) + u64::from(init_size);
    if need > ram_end {
        return Err(LoaderError::KernelTooBig {
            mem_mib: mib(ram_end),
            need_mib: mib(need),
        });
    }
    let res = BzImage::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
        .map_err(LoaderError::Load)?;
    let cmdline_size = hdr.cmdline_size;
    let initrd_max = hdr.initrd_addr_max;
    Ok(LoadedKernel {
        entry: EntryPoint::Linux64(res.kernel_load.0 + 0x200),
        end: need.max(res.kernel_end),
        setup_header: res.setup_header,
        cmdline_max: (cmdline_size as usize).min(CMDLINE_MAX_SIZE - 1),
        initrd_limit: ram_end.min(u64::from(initrd_max) + 1),
    })
}

/// Total bytes of guest RAM.
pub fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

/// Places the initrd as high as the kernel allows, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    file: &mut File,
) -> Result<LoadedInitrd, LoaderError> {
    let size = file.seek(SeekFrom::End(0)).map_err(LoaderError::Read)?;
    file.rewind().map_err(LoaderError::Read)?;
    let too_big = || LoaderError::InitrdTooBig {
        mem_mib: mib(low_ram_end(mem_size(mem))),
        initrd_kib: size.div_ceil(1024),
    };
    let addr = kernel
        .initrd_limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.end.next_multiple_of(0x1000))
        .ok_or_else(too_big)?;
    let len = usize::try_from(size).map_err(|_| too_big())?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(|_| LoaderError::Write("the initrd"))?;
    Ok(LoadedInitrd { addr, size })
}

/// Checks the command line against the kernel's limit and writes it, NUL-terminated.
pub fn load_cmdline(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
) -> Result<(), LoaderError> {
    check_cmdline(cmdline, kernel.cmdline_max)?;
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_START))
        .and_then(|_| mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64)))
        .map_err(|_| LoaderError::Write("the command line"))
}

/// The command-line rules: no NUL, at most `max` bytes.
pub fn check_cmdline(cmdline: &str, max: usize) -> Result<(), LoaderError> {
    if cmdline.contains('\0') {
        return Err(LoaderError::CmdlineNul);
    }
    if cmdline.len() > max {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// The kind of an e820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (EBDA, BIOS area with the ACPI tables).
    Reserved = 2,
}

/// The guest's memory map for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, E820Kind)> {
    let low_end = low_ram_end(mem_size);
    let mut map = vec![
        (0, EBDA_START, E820Kind::Ram),
        (EBDA_START, LOW_HOLE_START - EBDA_START, E820Kind::Reserved),
        (ACPI_START, ACPI_END - ACPI_START, E820Kind::Reserved),
        (HIMEM_START, low_end - HIMEM_START, E820Kind::Ram),
    ];
    if mem_size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820Kind::Ram));
    }
    map
}

/// Writes the Linux zero page for a 64-bit boot protocol entry.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    initrd: Option<LoadedInitrd>,
    cmdline_len: usize,
    rsdp: u64,
) -> Result<(), LoaderError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = 0xaa55;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags |= 0x01 | 0x80; // LOADED_HIGH, CAN_USE_HEAP
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let map = e820_map(mem_size(mem));
    for (slot, (addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| LoaderError::Write("the zero page"))
}

/// Writes `hvm_start_info` (with the initrd as module 0 and the memory map) for a PVH entry.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<LoadedInitrd>,
    rsdp: u64,
) -> Result<(), LoaderError> {
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    let modlist_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64;
    let map = e820_map(mem_size(mem));
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let write_err = |_| LoaderError::Write("the PVH start info");
    if let Some(rd) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
        let module = hvm_modlist_entry {
            paddr: rd.addr,
            size: rd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(write_err)?;
    }
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind as u32,
            reserved: 0,
        };
        let at = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(write_err)?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMemoryMmap {
        let regions: Vec<_> = ram_regions(size)
            .into_iter()
            .map(|(a, s)| (a, s as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&regions).unwrap()
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// A minimal ELF64 with one PT_LOAD of `code` at physical address `paddr`.
    pub(crate) fn tiny_elf(paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[0..4].copy_from_slice(ELF_MAGIC);
        e[4] = 2;
        e[5] = 1;
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut e[64..];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(code);
        e
    }

    #[test]
    fn elf_without_pvh_note_is_entered_in_64_bit_mode() {
        let m = mem(32 << 20);
        let mut f = file_with(&tiny_elf(0x20_0000, &[0xf4, 0xeb, 0xfd], 0x1000));
        let k = load_kernel(&m, &mut f).unwrap();
        assert_eq!(k.entry, EntryPoint::Linux64(0x20_0000));
        assert_eq!(k.end, 0x20_1000);
        let b: u8 = m.read_obj(GuestAddress(0x20_0000)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn elf_larger_than_memory_is_refused_with_sizes() {
        let m = mem(16 << 20);
        let mut f = file_with(&tiny_elf(0x100_0000, &[0x90], 8 << 20));
        let err = load_kernel(&m, &mut f).unwrap_err();
        assert!(
            matches!(
                err,
                LoaderError::KernelTooBig {
                    mem_mib: 16,
                    need_mib: 24
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem(16 << 20);
        let mut f = file_with(&[0u8; 4096]);
        assert!(matches!(
            load_kernel(&m, &mut f),
            Err(LoaderError::UnknownFormat)
        ));
        let mut empty = file_with(&[]);
        assert!(matches!(
            load_kernel(&m, &mut empty),
            Err(LoaderError::UnknownFormat)
        ));
    }

    #[test]
    fn elf_with_absurd_program_headers_is_refused() {
        let m = mem(16 << 20);
        let mut e = tiny_elf(0x20_0000, &[0x90], 1);
        e[56..58].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(matches!(
            load_kernel(&m, &mut file_with(&e)),
            Err(LoaderError::BadElf(_))
        ));
        let mut e = tiny_elf(0x20_0000, &[0x90], 1);
        e[64 + 40..64 + 48].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            load_kernel(&m, &mut file_with(&e)),
            Err(LoaderError::BadElf(_))
        ));
    }

    #[test]
    fn bzimage_with_old_protocol_is_refused() {
        let m = mem(64 << 20);
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 4; // setup_sects
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x20bu16.to_le_bytes());
        let err = load_kernel(&m, &mut file_with(&img)).unwrap_err();
        assert!(matches!(
            err,
            LoaderError::NoLongModeEntry {
                major: 2,
                minor: 11
            }
        ));
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_above_the_kernel() {
        let m = mem(32 << 20);
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64(0x100_0000),
            end: 0x120_0000,
            setup_header: None,
            cmdline_max: 2047,
            initrd_limit: 32 << 20,
        };
        let rd = load_initrd(&m, &kernel, &mut file_with(&[7u8; 5000])).unwrap();
        assert_eq!(rd.size, 5000);
        assert_eq!(rd.addr % 4096, 0);
        assert!(rd.addr + rd.size <= 32 << 20);
        assert!(rd.addr >= 0x120_0000);
        let b: u8 = m.read_obj(GuestAddress(rd.addr + 4999)).unwrap();
        assert_eq!(b, 7);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let m = mem(16 << 20);
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64(0x100_0000),
            end: 0xf0_0000,
            setup_header: None,
            cmdline_max: 2047,
            initrd_limit: 16 << 20,
        };
        let err = load_initrd(&m, &kernel, &mut file_with(&vec![0u8; 2 << 20])).unwrap_err();
        assert!(matches!(
            err,
            LoaderError::InitrdTooBig {
                mem_mib: 16,
                initrd_kib: 2048
            }
        ));
    }

    #[test]
    fn cmdline_limit_is_enforced_and_nul_refused() {
        assert!(check_cmdline(&"a".repeat(2047), 2047).is_ok());
        assert!(matches!(
            check_cmdline(&"a".repeat(2048), 2047),
            Err(LoaderError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(matches!(
            check_cmdline("a\0b", 2047),
            Err(LoaderError::CmdlineNul)
        ));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem(16 << 20);
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64(0),
            end: 0,
            setup_header: None,
            cmdline_max: 100,
            initrd_limit: 0,
        };
        load_cmdline(&m, &kernel, "console=ttyS0").unwrap();
        let mut buf = [0xffu8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn e820_has_low_ram_reserved_bios_areas_and_high_ram() {
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820Kind::Ram));
        assert!(map.contains(&(ACPI_START, ACPI_END - ACPI_START, E820Kind::Reserved)));
        assert_eq!(
            map.last().unwrap(),
            &(HIMEM_START, (256 << 20) - HIMEM_START, E820Kind::Ram)
        );
        let ram: u64 = map
            .iter()
            .filter(|e| e.2 == E820Kind::Ram)
            .map(|e| e.1)
            .sum();
        assert_eq!(ram, (256 << 20) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn e820_splits_around_the_mmio_gap() {
        let map = e820_map(4 << 30);
        assert!(map.contains(&(HIMEM_START, MMIO_GAP_START - HIMEM_START, E820Kind::Ram)));
        assert!(map.contains(&(MMIO_GAP_END, (4 << 30) - MMIO_GAP_START, E820Kind::Ram)));
        assert!(map
            .iter()
            .all(|e| e.0 + e.1 <= MMIO_GAP_START || e.0 >= MMIO_GAP_END));
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_rsdp_and_e820() {
        let m = mem(64 << 20);
        let kernel = LoadedKernel {
            entry: EntryPoint::Linux64(0x100_0000),
            end: 0x200_0000,
            setup_header: None,
            cmdline_max: 2047,
            initrd_limit: 64 << 20,
        };
        let rd = LoadedInitrd {
            addr: 0x300_0000,
            size: 1234,
        };
        write_zero_page(&m, &kernel, Some(rd), 10, ACPI_START).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (ptr, image, size, flag, rsdp) = (
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.hdr.boot_flag,
            p.acpi_rsdp_addr,
        );
        assert_eq!(ptr as u64, CMDLINE_START);
        assert_eq!((image, size), (0x300_0000, 1234));
        assert_eq!(flag, 0xaa55);
        assert_eq!(rsdp, ACPI_START);
        assert_eq!(p.e820_entries as usize, e820_map(64 << 20).len());
        let first = p.e820_table[0];
        assert_eq!({ first.r#type }, 1);
    }

    #[test]
    fn pvh_start_info_lists_initrd_module_and_memory_map() {
        let m = mem(64 << 20);
        let rd = LoadedInitrd {
            addr: 0x300_0000,
            size: 99,
        };
        write_pvh_start_info(&m, Some(rd), ACPI_START).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 99));
        let last: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(
                info.memmap_paddr + (info.memmap_entries as u64 - 1) * 24,
            ))
            .unwrap();
        assert_eq!(last.addr + last.size, 64 << 20);
    }
}
