//! A tiny x86_64 test kernel, a few hundred instructions, and the ELF file that carries it.
//!
//! The code is assembled by rustc's own assembler (`global_asm!`) into a data section of the
//! host program, never run on the host: [`elf_image`] copies the bytes into a one-segment
//! ELF that `ember run --kernel` (or `qemu -kernel`... with a PVH note it would need) boots
//! through the 64-bit Linux boot protocol entry: long mode, identity paging, RSI = zero page.
//! Everything it references is RIP-relative or a fixed boot-protocol address, so it runs
//! wherever it is loaded.
//!
//! It prints a banner on COM1, then acts on the words of its command line:
//!
//! | word       | action                                                            |
//! |------------|-------------------------------------------------------------------|
//! | `cpuid`    | prints `cpuid.1.ecx=XXXXXXXX` (what the VMM's CPUID shows)         |
//! | `echo`     | echoes serial input until it reads `q`                           |
//! | `exit=N`   | writes N (decimal) to the debug-exit port 0xf4: status (N<<1)\|1  |
//! | `reboot`   | pulses the i8042 reset line                                       |
//! | `triple`   | loads an empty IDT and raises an exception: a triple fault        |
//! | `halt`     | stops forever (interrupts off)                                    |
//!
//! With none of the ending words it powers off through ACPI (PM1a_CNT, S5).

use std::arch::global_asm;

global_asm!(
    r#"
    .pushsection .rodata.ember_tiny_guest, "a"
    .balign 16
    .globl ember_tiny_guest_start
    .globl ember_tiny_guest_end
ember_tiny_guest_start:
    .code64
    mov rsp, 0x8ff0
    lea rsi, [rip + tg_banner]
    call tg_puts
    // The command line, from the zero page (boot_params.hdr.cmd_line_ptr).
    mov r12d, dword ptr [0x7228]

tg_next_word:
    mov rsi, r12
    call tg_skip_spaces
    mov r12, rsi
    cmp byte ptr [r12], 0
    je tg_default_end
    lea rdi, [rip + tg_w_cpuid]
    call tg_word_is
    jz tg_do_cpuid
    lea rdi, [rip + tg_w_echo]
    call tg_word_is
    jz tg_do_echo
    lea rdi, [rip + tg_w_exit]
    call tg_prefix_is
    jz tg_do_exit
    lea rdi, [rip + tg_w_reboot]
    call tg_word_is
    jz tg_do_reboot
    lea rdi, [rip + tg_w_triple]
    call tg_word_is
    jz tg_do_triple
    lea rdi, [rip + tg_w_halt]
    call tg_word_is
    jz tg_do_halt
tg_skip_word:
    mov al, byte ptr [r12]
    test al, al
    jz tg_next_word
    cmp al, ' '
    je tg_next_word
    inc r12
    jmp tg_skip_word

tg_do_cpuid:
    lea rsi, [rip + tg_cpuid_label]
    call tg_puts
    mov eax, 1
    xor ecx, ecx
    cpuid
    mov eax, ecx
    call tg_put_hex32
    mov al, 10
    call tg_putc
    jmp tg_skip_word

tg_do_echo:
    lea rsi, [rip + tg_echo_label]
    call tg_puts
tg_echo_loop:
    mov dx, 0x3fd
    in al, dx
    test al, 1
    jz tg_echo_loop
    mov dx, 0x3f8
    in al, dx
    cmp al, 'q'
    je tg_skip_word
    call tg_putc
    jmp tg_echo_loop

tg_do_exit:
    add r12, 5
    xor eax, eax
tg_exit_digits:
    movzx ecx, byte ptr [r12]
    sub ecx, '0'
    cmp ecx, 9
    ja tg_exit_now
    imul eax, eax, 10
    add eax, ecx
    inc r12
    jmp tg_exit_digits
tg_exit_now:
    mov dx, 0xf4
    out dx, al
    jmp tg_do_halt

tg_do_reboot:
    mov al, 0xfe
    out 0x64, al
    jmp tg_do_halt

tg_do_triple:
    lidt [rip + tg_null_idt]
    ud2

tg_default_end:
    lea rsi, [rip + tg_bye]
    call tg_puts
    mov dx, 0x604
    mov ax, 0x3400
    out dx, ax
tg_do_halt:
    cli
    hlt
    jmp tg_do_halt

// rsi: string; returns rsi at its first non-space byte.
tg_skip_spaces:
    cmp byte ptr [rsi], ' '
    jne .Ltg_skip_spaces_1
    inc rsi
    jmp tg_skip_spaces
.Ltg_skip_spaces_1:  ret

// ZF set when the text at r12 starts with the NUL-terminated string at rdi.
tg_prefix_is:
    mov rsi, r12
.Ltg_prefix_is_1:  mov al, byte ptr [rdi]
    test al, al
    jz .Ltg_prefix_is_2
    cmp al, byte ptr [rsi]
    jne .Ltg_prefix_is_3
    inc rdi
    inc rsi
    jmp .Ltg_prefix_is_1
.Ltg_prefix_is_2:  xor eax, eax
.Ltg_prefix_is_3:  ret

// ZF set when the word at r12 is exactly the string at rdi.
tg_word_is:
    call tg_prefix_is
    jnz .Ltg_word_is_1
    mov al, byte ptr [rsi]
    test al, al
    jz .Ltg_word_is_1
    cmp al, ' '
.Ltg_word_is_1:  ret

// al: byte to send on COM1, once the transmitter is empty.
tg_putc:
    push rdx
    push rax
    mov dx, 0x3fd
.Ltg_putc_1:  in al, dx
    test al, 0x20
    jz .Ltg_putc_1
    pop rax
    mov dx, 0x3f8
    out dx, al
    pop rdx
    ret

// rsi: NUL-terminated string to print.
tg_puts:
    lodsb
    test al, al
    jz .Ltg_puts_1
    call tg_putc
    jmp tg_puts
.Ltg_puts_1:  ret

// eax: printed as 8 hex digits.
tg_put_hex32:
    mov ecx, 8
    mov edx, eax
.Ltg_put_hex32_1:  rol edx, 4
    mov eax, edx
    and eax, 0xf
    lea rsi, [rip + tg_hex]
    mov al, byte ptr [rsi + rax]
    call tg_putc
    dec ecx
    jnz .Ltg_put_hex32_1
    ret

    .balign 8
tg_null_idt:
    .word 0
    .quad 0
tg_banner:      .asciz "tiny: hello from the tiny kernel\n"
tg_bye:         .asciz "tiny: powering off\n"
tg_cpuid_label: .asciz "tiny: cpuid.1.ecx="
tg_echo_label:  .asciz "tiny: echo until q\n"
tg_hex:         .ascii "0123456789abcdef"
tg_w_cpuid:     .asciz "cpuid"
tg_w_echo:      .asciz "echo"
tg_w_exit:      .asciz "exit="
tg_w_reboot:    .asciz "reboot"
tg_w_triple:    .asciz "triple"
tg_w_halt:      .asciz "halt"
ember_tiny_guest_end:
    .popsection
"#
);

extern "C" {
    static ember_tiny_guest_start: u8;
    static ember_tiny_guest_end: u8;
}

/// Guest physical address the code is loaded at and entered.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// The assembled guest code.
pub fn code() -> &'static [u8] {
    // SAFETY: both symbols are labels in the same read-only section emitted above, start
    // before end; the bytes between them are initialized data that lives for the program.
    unsafe {
        let start = std::ptr::addr_of!(ember_tiny_guest_start);
        let end = std::ptr::addr_of!(ember_tiny_guest_end);
        std::slice::from_raw_parts(start, end.offset_from(start) as usize)
    }
}

/// The code wrapped in a minimal ELF64 executable: one PT_LOAD at [`LOAD_ADDR`], entry at
/// its first byte.
pub fn elf_image() -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code = code();
    let mut e = Vec::with_capacity(EHDR + PHDR + code.len());
    e.extend_from_slice(b"\x7fELF");
    e.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    e.extend_from_slice(&[0; 8]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    e.extend_from_slice(&(EHDR as u64).to_le_bytes()); // program headers
    e.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    e.extend_from_slice(&(EHDR as u16).to_le_bytes());
    e.extend_from_slice(&(PHDR as u16).to_le_bytes());
    e.extend_from_slice(&1u16.to_le_bytes());
    e.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    e.extend_from_slice(&((EHDR + PHDR) as u64).to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(code);
    e
}
