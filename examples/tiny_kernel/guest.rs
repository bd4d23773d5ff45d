//! A tiny x86_64 test kernel, a few hundred instructions, and the ELF file that carries it.
//!
//! The code is assembled by rustc's own assembler (`global_asm!`) into a data section of the
//! host program, never run on the host: [`elf_image`] copies the bytes into a one-segment
//! ELF that `ember run --kernel` (or `qemu -kernel`... with a PVH note it would need) boots
//! through the 64-bit Linux boot protocol entry: long mode, identity paging, RSI = zero page.
//! Everything it references is RIP-relative, reached through the zero page, or a fixed
//! address (the boot stack below 0x9000, the `dirty=` region at 8 MiB), so it runs wherever
//! it is loaded.
//!
//! It prints a banner on COM1, then acts on the words of its command line:
//!
//! | word       | action                                                            |
//! |------------|-------------------------------------------------------------------|
//! | `cpuid`    | prints `cpuid.1.ecx=XXXXXXXX` (what the VMM's CPUID shows)         |
//! | `echo`     | echoes serial input until it reads `q`                           |
//! | `exit=N`   | writes N (decimal) to the debug-exit port 0xf4: status (N<<1)\|1  |
//! | `reboot`   | pulses the i8042 reset line                                       |
//! | `sleepctl` | writes S5 (0x34) to port 0x600: the ACPI hardware-reduced sleep     |
//! |            | control register where Cloud Hypervisor has it (it exits on that)  |
//! | `triple`   | loads an empty IDT and raises an exception: a triple fault        |
//! | `halt`     | stops forever (interrupts off)                                    |
//! | `count`    | prints `tick 1`, `tick 2`, ... on COM1 every 100 ms, forever      |
//! | `count=N`  | the same, then powers off right after `tick N` (`count=0`: never) |
//! | `dirty=K`  | with `count`: stores K KiB (at most 4096) between ticks (below)   |
//! | `idle`     | prints `tiny: idle`, then `sti; hlt` forever                      |
//! | `ejector`  | prints `tiny: ejector`, then forever: every ~10 ms reads the PCI   |
//! |            | hotplug controller's `PCID` (port 0xae04) and writes what it read  |
//! |            | to `PCEJ` (0xae08): a guest that gives back every slot asked back |
//! | `eject=N`  | writes slot N's bit (N < 32) to `PCEJ` once, asked or not (Linux: |
//! |            | `echo 0 > /sys/bus/pci/slots/N/power`), and goes on              |
//!
//! With none of the ending words it powers off through ACPI (PM1a_CNT, S5). `count`,
//! `idle`, `ejector`, `halt`, `exit=`, `reboot`, `sleepctl` and `triple` end the word list; `dirty=K` is looked up
//! on the whole line, before or after `count`.
//!
//! **`count`.** Before the first tick it prints `tiny: counting, one tick = C TSC cycles`.
//! The tick counter lives in a register (r13) and only ever increments, so a VM paused or
//! saved after `tick N` prints `tick N+1` next when it runs again. The delay is wall time
//! read from the TSC, never an instruction count. The TSC rate is calibrated once against
//! the PIT: ~20 ms of channel 2 counting between two (TSC, latched count) pairs, each the
//! tightest of three reads around the latch, so the vCPU being descheduled meanwhile does
//! not skew it (timing OUT2 going high would: that is seen late). The PIT was chosen over
//! CPUID leaves 0x15/0x16 (the host's crystal data, absent or wrong under TSC scaling) and
//! the hypervisor leaf 0x40000010 (not in KVM's supported CPUID, so absent under ember): it
//! measures the guest's TSC as it runs and needs nothing but the PIT every PC VMM has.
//! Each tick's deadline is the TSC read just before that tick is printed plus one period
//! (printing and dirtying count within the period); the wait ends when the TSC is `>=` the
//! deadline, so a TSC that jumped forward (restore, migration) gives the next tick at once,
//! never a burst of catch-up ticks; a TSC that goes backwards restarts a full period from
//! its new value, so the guest never waits much longer than one period either way. An
//! iteration cap would not do here: the loop's speed differs ~1000x between hosts that
//! emulate guest kernel code and hosts that run it, and a migrated guest may meet both.
//!
//! **`dirty=K`.** After each tick it stores K KiB of the tick number (as qwords, `rep
//! stosq`) into a 4 MiB region at guest physical 8 MiB, going on where the previous tick
//! stopped and wrapping around: the memory really changes every tick, ~10·K KiB/s. The
//! region needs RAM at 8-12 MiB, which ember's smallest guest (16 MiB) has. Where guest
//! kernel code is emulated the stores run at ~5 MiB/s: K up to ~400 keeps the 100 ms
//! period there, larger K stretches each tick to the time its stores take.
//!
//! **`idle`.** Fills a 256-entry IDT (inside the loaded image) whose gates all lead to a
//! bare `iretq` and loops on `sti; hlt`: with an in-kernel irqchip KVM handles the HLT
//! itself, so the vCPU sleeps in KVM_RUN without exits to the VMM. Nothing is acknowledged
//! (no EOI), so a stray interrupt is taken at most once per source and never faults; the boot
//! state has no device raising one anyway. An exception with an error code would not
//! return cleanly, but nothing in the loop raises one.

// The PVH stub switches to AT&T syntax inside the one asm block (Intel syntax refuses the
// label differences it needs as displacements).
#![allow(bad_asm_style)]

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
    mov qword ptr [rip + tg_zero_page], rsi
    lea rsi, [rip + tg_banner]
    call tg_puts
    // The command line, from the zero page (boot_params.hdr.cmd_line_ptr).
    mov rax, qword ptr [rip + tg_zero_page]
    mov r12d, dword ptr [rax + 0x228]

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
    lea rdi, [rip + tg_w_sleepctl]
    call tg_word_is
    jz tg_do_sleepctl
    lea rdi, [rip + tg_w_triple]
    call tg_word_is
    jz tg_do_triple
    lea rdi, [rip + tg_w_halt]
    call tg_word_is
    jz tg_do_halt
    lea rdi, [rip + tg_w_count]
    call tg_word_is
    jz tg_do_count
    lea rdi, [rip + tg_w_count_eq]
    call tg_prefix_is
    jz tg_do_count_n
    lea rdi, [rip + tg_w_idle]
    call tg_word_is
    jz tg_do_idle
    lea rdi, [rip + tg_w_ejector]
    call tg_word_is
    jz tg_do_ejector
    lea rdi, [rip + tg_w_eject_eq]
    call tg_prefix_is
    jz tg_do_eject
tg_skip_word:
    mov al, byte ptr [r12]
    test al, al
    jz tg_next_word
    cmp al, ' '
    je tg_next_word
    inc r12
    jmp tg_skip_word

tg_do_eject:
    lea rsi, [r12 + 6]
    call tg_parse_dec
    mov ecx, eax
    mov eax, 1
    shl eax, cl
    mov dx, 0xae08
    out dx, eax
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
    lea rsi, [r12 + 5]
    call tg_parse_dec
    mov dx, 0xf4
    out dx, al
    jmp tg_do_halt

tg_do_reboot:
    mov al, 0xfe
    out 0x64, al
    jmp tg_do_halt

tg_do_sleepctl:
    mov dx, 0x600
    mov al, 0x34
    out dx, al
    jmp tg_do_halt

tg_do_triple:
    lidt [rip + tg_null_idt]
    ud2

// count / count=N [dirty=K]. Registers for good: r13 = last tick printed, r14 = the tick
// to stop after (0: never), r15 = qwords to dirty per tick, rbp = where the next dirty
// write goes in the 4 MiB region, rbx = TSC cycles per tick, r12 = this tick's deadline.
tg_do_count_n:
    call tg_parse_dec
    mov r14, rax
    jmp tg_count_start
tg_do_count:
    xor r14d, r14d
tg_count_start:
    cld
    lea rdi, [rip + tg_w_dirty_eq]
    call tg_arg_value
    mov ecx, 4096
    cmp rax, rcx
    cmova rax, rcx
    shl rax, 7
    mov r15, rax
    call tg_tsc_per_10ms
    imul rbx, rax, 10
    lea rsi, [rip + tg_count_label]
    call tg_puts
    mov rax, rbx
    call tg_put_dec
    lea rsi, [rip + tg_count_label2]
    call tg_puts
    xor r13d, r13d
    xor ebp, ebp
tg_count_loop:
    rdtsc
    shl rdx, 32
    or rax, rdx
    lea r12, [rax + rbx]
    inc r13
    lea rsi, [rip + tg_tick_label]
    call tg_puts
    mov rax, r13
    call tg_put_dec
    mov al, 10
    call tg_putc
    cmp r13, r14
    je tg_default_end
    mov rax, r13
    call tg_dirty
    // Wait until the TSC reaches the deadline. A TSC that jumped forward (restore,
    // migration) ends the wait at once; one that went backwards restarts a full period
    // from where it is now, so no jump makes the guest wait much longer than a tick.
    mov r9, r12
    sub r9, rbx
tg_count_wait:
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, r9
    jae .Ltg_count_wait_1
    lea r12, [rax + rbx]
.Ltg_count_wait_1:
    mov r9, rax
    cmp rax, r12
    jb tg_count_wait
    jmp tg_count_loop

// idle: every vector goes to a bare iretq, then sti; hlt forever.
tg_do_idle:
    lea rsi, [rip + tg_idle_label]
    call tg_puts
    lea rdx, [rip + tg_iret]
    mov rax, rdx
    and eax, 0xffff
    xor ecx, ecx
    mov cx, cs
    shl rcx, 16
    or rax, rcx
    mov rcx, 0x8e00
    shl rcx, 32
    or rax, rcx
    mov rcx, rdx
    shr rcx, 16
    and ecx, 0xffff
    shl rcx, 48
    or rax, rcx
    shr rdx, 32
    lea rdi, [rip + tg_idt]
    mov r8, rdi
    mov ecx, 256
.Ltg_do_idle_1:
    mov qword ptr [rdi], rax
    mov qword ptr [rdi + 8], rdx
    add rdi, 16
    dec ecx
    jnz .Ltg_do_idle_1
    sub rsp, 16
    mov word ptr [rsp], 4095
    mov qword ptr [rsp + 2], r8
    lidt [rsp]
    add rsp, 16
.Ltg_do_idle_2:
    sti
    hlt
    jmp .Ltg_do_idle_2
tg_iret:
    iretq

// ejector: PCID -> PCEJ every ~10 ms (a spin of pause instructions between polls).
tg_do_ejector:
    lea rsi, [rip + tg_ejector_label]
    call tg_puts
.Ltg_eject_1:
    mov dx, 0xae04
    in eax, dx
    test eax, eax
    jz .Ltg_eject_2
    mov dx, 0xae08
    out dx, eax
.Ltg_eject_2:
    mov ecx, 5000
.Ltg_eject_3:
    pause
    dec ecx
    jnz .Ltg_eject_3
    jmp .Ltg_eject_1

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

// rsi: decimal digits; returns their value in rax, rsi past them.
tg_parse_dec:
    xor eax, eax
.Ltg_parse_dec_1:
    movzx ecx, byte ptr [rsi]
    sub ecx, '0'
    cmp ecx, 9
    ja .Ltg_parse_dec_2
    imul rax, rax, 10
    add rax, rcx
    inc rsi
    jmp .Ltg_parse_dec_1
.Ltg_parse_dec_2:
    ret

// rdi: "name="; returns in rax the decimal value of the first word of the command line
// that starts with it, 0 when there is none.
tg_arg_value:
    push r12
    mov r8, rdi
    mov rax, qword ptr [rip + tg_zero_page]
    mov r12d, dword ptr [rax + 0x228]
.Ltg_arg_value_1:
    mov rsi, r12
    call tg_skip_spaces
    mov r12, rsi
    cmp byte ptr [r12], 0
    je .Ltg_arg_value_4
    mov rdi, r8
    call tg_prefix_is
    jnz .Ltg_arg_value_2
    call tg_parse_dec
    pop r12
    ret
.Ltg_arg_value_2:
    mov al, byte ptr [r12]
    test al, al
    jz .Ltg_arg_value_1
    cmp al, ' '
    je .Ltg_arg_value_1
    inc r12
    jmp .Ltg_arg_value_2
.Ltg_arg_value_4:
    xor eax, eax
    pop r12
    ret

// rax: pattern. Stores r15 qwords of it from 8 MiB + rbp on, wrapping around the 4 MiB
// region; rbp ends where the next call goes on.
tg_dirty:
    mov r8, r15
.Ltg_dirty_1:
    test r8, r8
    jz .Ltg_dirty_2
    mov ecx, 0x400000
    sub rcx, rbp
    shr rcx, 3
    cmp rcx, r8
    cmova rcx, r8
    sub r8, rcx
    lea rdi, [rbp + 0x800000]
    lea rbp, [rbp + rcx * 8]
    and ebp, 0x3fffff
    rep stosq
    jmp .Ltg_dirty_1
.Ltg_dirty_2:
    ret

// Returns in rax the TSC cycles of 10 ms, measured against PIT channel 2 (mode 0 from
// 0xffff, 1.193182 MHz): a (TSC, count) pair, ~20 ms of counting, another pair. The pairs
// are tight (see tg_pit_sample), so the vCPU being descheduled while it waits does not
// matter. When the count may have wrapped (OUT2 on port 0x61 already high, or the start
// pair came late) it measures again.
tg_tsc_per_10ms:
    push rbx
    push r12
    push r13
.Ltg_tsc_per_10ms_1:
    in al, 0x61
    and al, 0xfc
    or al, 1
    out 0x61, al
    mov al, 0xb0
    out 0x43, al
    mov al, 0xff
    out 0x42, al
    out 0x42, al
    call tg_pit_sample
    mov r12, rax
    mov r13, rcx
    cmp r13, 30000
    jb .Ltg_tsc_per_10ms_1
    lea rbx, [r13 - 24000]
.Ltg_tsc_per_10ms_2:
    mov al, 0x80
    out 0x43, al
    in al, 0x42
    movzx ecx, al
    in al, 0x42
    movzx eax, al
    shl eax, 8
    or ecx, eax
    cmp rcx, rbx
    ja .Ltg_tsc_per_10ms_2
    call tg_pit_sample
    mov r8, rax
    in al, 0x61
    test al, 0x20
    jnz .Ltg_tsc_per_10ms_1
    mov rax, r8
    sub rax, r12
    mov rdx, 1193182
    mul rdx
    sub r13, rcx
    imul rcx, r13, 100
    div rcx
    pop r13
    pop r12
    pop rbx
    ret

// Latches PIT channel 2 between two TSC reads, three times, and keeps the tightest:
// returns rax = the TSC midway between the reads around the latch, rcx = the count.
// A vCPU descheduled between the reads gives a wide pair, which loses.
tg_pit_sample:
    push rbx
    push r12
    push r13
    mov r12, -1
    mov r10d, 3
.Ltg_pit_sample_1:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r8, rax
    mov al, 0x80
    out 0x43, al
    rdtsc
    shl rdx, 32
    or rax, rdx
    sub rax, r8
    mov r9, rax
    in al, 0x42
    movzx ecx, al
    in al, 0x42
    movzx eax, al
    shl eax, 8
    or ecx, eax
    cmp r9, r12
    jae .Ltg_pit_sample_2
    mov r12, r9
    shr r9, 1
    lea r13, [r8 + r9]
    mov ebx, ecx
.Ltg_pit_sample_2:
    dec r10d
    jnz .Ltg_pit_sample_1
    mov rax, r13
    mov ecx, ebx
    pop r13
    pop r12
    pop rbx
    ret

// rax: printed in decimal, no leading zeros.
tg_put_dec:
    mov r8, rsp
    sub rsp, 32
    mov rsi, r8
    mov ecx, 10
.Ltg_put_dec_1:
    xor edx, edx
    div rcx
    add dl, '0'
    dec rsi
    mov byte ptr [rsi], dl
    test rax, rax
    jnz .Ltg_put_dec_1
.Ltg_put_dec_2:
    mov al, byte ptr [rsi]
    call tg_putc
    inc rsi
    cmp rsi, r8
    jne .Ltg_put_dec_2
    mov rsp, r8
    ret

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

// PVH entry (the ELF note XEN_ELFNOTE_PHYS32_ENTRY of `pvh_elf_image`): 32-bit protected
// mode, paging off, ebx = hvm_start_info. Identity-maps the first 1 GiB with 2 MiB pages
// (tables in the image), enters long mode and joins the 64-bit entry with a "zero page"
// pointer whose cmd_line_ptr (+0x228) is the start info's cmdline_paddr (+24). Numeric
// labels are avoided: in Intel syntax `1b` reads as a binary number.
    .balign 16
    .globl ember_tiny_guest_pvh
ember_tiny_guest_pvh:
    .code32
    // AT&T syntax here: Intel syntax refuses label differences as displacements.
    .att_syntax prefix
    movl $0x8ff0, %esp
    call .Ltg_pvh_here
.Ltg_pvh_here:
    popl %ebp
    leal (tg_pvh_tables - .Ltg_pvh_here + 0xfff)(%ebp), %edi
    andl $0xfffff000, %edi
    leal 0x1003(%edi), %eax
    movl %eax, (%edi)
    leal 0x2003(%edi), %eax
    movl %eax, 0x1000(%edi)
    xorl %ecx, %ecx
.Ltg_pvh_pd:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, 0x2000(%edi, %ecx, 8)
    incl %ecx
    cmpl $512, %ecx
    jne .Ltg_pvh_pd
    movl %edi, %cr3
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    leal (tg_pvh_gdt - .Ltg_pvh_here)(%ebp), %eax
    movl %eax, (tg_pvh_gdtr + 2 - .Ltg_pvh_here)(%ebp)
    lgdtl (tg_pvh_gdtr - .Ltg_pvh_here)(%ebp)
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    leal (tg_pvh_64 - .Ltg_pvh_here)(%ebp), %eax
    pushl $0x08
    pushl %eax
    lretl
    .intel_syntax noprefix
    .code64
tg_pvh_64:
    mov eax, ebx
    lea rsi, [rax + 24 - 0x228]
    jmp ember_tiny_guest_start

    .balign 8
tg_pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
tg_pvh_gdtr:
    .word 23
    .long 0

    .balign 8
tg_zero_page:   .quad 0
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
tg_w_sleepctl:  .asciz "sleepctl"
tg_w_triple:    .asciz "triple"
tg_w_halt:      .asciz "halt"
tg_w_count:     .asciz "count"
tg_w_count_eq:  .asciz "count="
tg_w_dirty_eq:  .asciz "dirty="
tg_w_idle:      .asciz "idle"
tg_w_ejector:   .asciz "ejector"
tg_w_eject_eq:  .asciz "eject="
tg_count_label: .asciz "tiny: counting, one tick = "
tg_count_label2: .asciz " TSC cycles\n"
tg_tick_label:  .asciz "tick "
tg_idle_label:  .asciz "tiny: idle\n"
tg_ejector_label: .asciz "tiny: ejector\n"
    // The IDT `idle` fills in: 256 gates of 16 bytes.
    .balign 16
tg_idt:         .skip 4096
    // The PVH entry's page tables: PML4, PDPT and PD, 4 KiB-aligned inside this area.
tg_pvh_tables:  .skip 16384
ember_tiny_guest_end:
    .popsection
"#
);

extern "C" {
    static ember_tiny_guest_start: u8;
    static ember_tiny_guest_pvh: u8;
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

/// Offset of the PVH (32-bit) entry in [`code`].
fn pvh_entry_offset() -> u64 {
    // SAFETY: both are labels in the section emitted above; the PVH entry lies after the start.
    unsafe {
        let start = std::ptr::addr_of!(ember_tiny_guest_start);
        let pvh = std::ptr::addr_of!(ember_tiny_guest_pvh);
        pvh.offset_from(start) as u64
    }
}

/// The code wrapped in a minimal ELF64 executable: one PT_LOAD at [`LOAD_ADDR`], entry at
/// its first byte (the 64-bit Linux boot protocol entry).
pub fn elf_image() -> Vec<u8> {
    elf(None)
}

/// The same with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY), as `qemu -kernel`, Cloud Hypervisor
/// and Firecracker want an ELF kernel: every PVH-capable VMM enters it in 32-bit mode.
#[allow(dead_code)] // the example and one test use it; the other test crates include this file
pub fn pvh_elf_image() -> Vec<u8> {
    elf(Some((LOAD_ADDR + pvh_entry_offset()) as u32))
}

fn elf(pvh_entry: Option<u32>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    // The note: namesz, descsz, type 18, "Xen\0", the 32-bit entry.
    let note: Vec<u8> = match pvh_entry {
        Some(entry) => [4u32, 4, 18]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .chain(*b"Xen\0")
            .chain(entry.to_le_bytes())
            .collect(),
        None => Vec::new(),
    };
    let phnum = if note.is_empty() { 1 } else { 2 };
    let code_at = EHDR + PHDR * phnum + note.len();
    let code = code();
    let mut e = Vec::with_capacity(code_at + code.len());
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
    e.extend_from_slice(&(phnum as u16).to_le_bytes());
    e.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&7u32.to_le_bytes()); // RWX
    e.extend_from_slice(&(code_at as u64).to_le_bytes());
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // vaddr
    e.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // paddr
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    if !note.is_empty() {
        let at = (EHDR + PHDR * phnum) as u64;
        e.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        e.extend_from_slice(&4u32.to_le_bytes()); // R
        e.extend_from_slice(&at.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend_from_slice(&(note.len() as u64).to_le_bytes());
        e.extend_from_slice(&4u64.to_le_bytes());
        e.extend_from_slice(&note);
    }
    e.extend_from_slice(code);
    e
}
