; boot.asm -- the multiboot entry that runs snaplab's guest programs on the real QEMU.
; QEMU's -kernel loads the image (built by emulator/qemu_guest.py) at 1 MiB and enters
; :stub32 in 32-bit protected mode.  Image layout (addresses; file offset = address - 1 MiB):
;   0x100000  multiboot header (a.out kludge: load the whole file at 1 MiB)
;   0x100040  CONFIG: 16 qwords, the workload's configuration (fw_cfg keys), set by the host
;   0x100100  GDT pointer, 0x100110 IDT pointer, 0x100200 GDT (null, 64-bit code, data)
;   0x101000  stub32   0x102000 init64   0x103000 isr   0x103100 fault   0x104000 IDT
;   0x110000 + 0x10000*n  workload n (idle, dirty, disk, mixed), each assembled there
; Below 1 MiB: page tables at 0x20000..0x26000, stack below 0x80000, lab page 0x7000, as
; on snaplab; data pages from 0x200000.

;@stub32
    cli
    mov esp, 0x80000
    mov edi, 0x20000
    xor eax, eax
    mov ecx, 0x1800
    rep stosd
    mov dword ptr [0x20000], 0x21003
    mov dword ptr [0x21000], 0x22003
    mov dword ptr [0x21008], 0x23003
    mov dword ptr [0x21010], 0x24003
    mov dword ptr [0x21018], 0x25003
    mov edi, 0x22000
    mov eax, 0x83
    mov ecx, 2048
pd_fill:
    mov dword ptr [edi], eax
    add eax, 0x200000
    add edi, 8
    dec ecx
    jnz pd_fill
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, 0x20000
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    ; keystone gives "lgdt [m]" an operand-size prefix in 32-bit code and has no far jmp:
    ; both as bytes.  lgdt [0x100100]; jmp 0x08:0x102000 (into the 64-bit code segment)
    .byte 0x0f, 0x01, 0x15, 0x00, 0x01, 0x10, 0x00
    .byte 0xea, 0x00, 0x20, 0x10, 0x00, 0x08, 0x00

;@init64
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, 0x80000
    cld
    mov al, 0xFF                ; mask the legacy PICs: the BIOS's PIT tick would arrive as vector 8
    out 0x21, al
    out 0xA1, al
    lidt [0x100110]
    mov esi, 0xFEE00000
    mov eax, dword ptr [rsi + 0xF0]
    or eax, 0x1FF
    mov dword ptr [rsi + 0xF0], eax
    mov esi, 0xFED00000
    mov eax, dword ptr [rsi + 4]
    cmp eax, 10000000
    jne init_bad_hpet
    mov rax, qword ptr [rsi + 0x10]
    or rax, 1
    mov qword ptr [rsi + 0x10], rax
    mov rax, qword ptr [0x100050]
    cmp rax, 4
    jae init_bad_workload
    shl rax, 16
    add rax, 0x110000
    jmp rax
init_bad_hpet:
    mov al, 0x11
    jmp init_panic
init_bad_workload:
    mov al, 2
init_panic:
    mov dx, 0x505
    out dx, al
init_stop:
    cli
    hlt
    jmp init_stop

;@isr
    push rax
    mov eax, 0xFEE000B0
    mov dword ptr [rax], 0
    pop rax
    iretq

;@fault
    mov al, 0x12
    mov dx, 0x505
    out dx, al
fault_stop:
    cli
    hlt
    jmp fault_stop
