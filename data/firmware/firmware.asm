; firmware.asm -- snaplab's boot firmware (pflash0), x86-64, entry at FW_BASE + 0x1000.
;
; 1. prints a banner on the serial port;
; 2. reads the UEFI-style variable store on pflash1 (format: docs/varstore.md): prints
;    BootOrder, increments BootCount (appending a new record and marking the old one deleted,
;    as UEFI's variable driver does on NOR flash), compacting the store when it is full;
; 3. copies the workload chosen by fw_cfg key 2 from the image's table into RAM at 1 MiB
;    and jumps to it.
; Image layout (built by emulator/guest.py): [0, 0x1000) header with "SNAPFW01", workload count
; and (offset, size) pairs; [0x1000, ...) this code; then each workload, 4 KiB aligned.

fw_start:
    mov rsp, 0x80000
    cld
    movabs rsi, msg_banner
    call puts
    call vs_boot
    ; --- workload ---
    mov eax, 2
    call fwcfg
    mov rbx, rax
    movabs rsi, FW_BASE_PLUS_8
    mov ecx, dword ptr [rsi]
    cmp rbx, rcx
    jae fw_bad_workload
    movabs rsi, FW_BASE_PLUS_16
    mov eax, dword ptr [rsi + rbx*8]
    mov ecx, dword ptr [rsi + rbx*8 + 4]
    movabs rsi, FW_BASE_0
    add rsi, rax
    mov rdi, 0x100000
    rep movsb
    movabs rsi, msg_start
    call puts
    mov rax, rbx
    call putdec
    mov al, 10
    call putc
    mov rax, 0x100000
    jmp rax
fw_bad_workload:
    movabs rsi, msg_badwl
    call puts
    mov al, 2
    call panic

; ---------------- flash helpers (selected device) ----------------
flash_read:             ; eax = offset -> eax = dword
    push rdx
    mov dx, 0x544
    out dx, eax
    mov dx, 0x548
    in eax, dx
    pop rdx
    ret
flash_prog:             ; ecx = offset, eax = dword (NOR: bits only cleared)
    push rdx
    push rax
    mov eax, ecx
    mov dx, 0x544
    out dx, eax
    pop rax
    mov dx, 0x548
    out dx, eax
    pop rdx
    ret
flash_erase:            ; eax = offset of a 4 KiB sector
    push rdx
    mov dx, 0x544
    out dx, eax
    mov eax, 1
    mov dx, 0x54C
    out dx, eax
    pop rdx
    ret

; rec_match: r12 = record offset, rsi = name (20 bytes), rdi = guid (16 bytes) -> eax = 1 if equal
rec_match:
    push rbx
    push rcx
    lea eax, [r12d + 8]
    call flash_read
    cmp eax, 20
    jne rec_nomatch
    xor ecx, ecx
rec_guid:
    lea eax, [r12d + 16]
    add eax, ecx
    call flash_read
    cmp eax, dword ptr [rdi + rcx]
    jne rec_nomatch
    add ecx, 4
    cmp ecx, 16
    jb rec_guid
    xor ecx, ecx
rec_name:
    lea eax, [r12d + 32]
    add eax, ecx
    call flash_read
    cmp eax, dword ptr [rsi + rcx]
    jne rec_nomatch
    add ecx, 4
    cmp ecx, 20
    jb rec_name
    mov eax, 1
    pop rcx
    pop rbx
    ret
rec_nomatch:
    xor eax, eax
    pop rcx
    pop rbx
    ret

; ---------------- variable store ----------------
; r15 = store size, r12 = scan position, r13 = BootCount record, r14 = BootOrder record
vs_boot:
    mov al, 1
    mov dx, 0x540
    out dx, al
    mov dx, 0x550
    in eax, dx
    mov r15d, eax
    cmp r15d, 0x1000
    jb vs_absent
    xor eax, eax
    call flash_read
    cmp eax, 0x53564E53          ; "SNVS"
    je vs_scan_start
    movabs rsi, msg_format
    call puts
    call vs_format
vs_scan_start:
    mov r12d, 64
    xor r13d, r13d
    xor r14d, r14d
vs_scan:
    lea eax, [r12d + 32]
    cmp eax, r15d
    ja vs_scan_end
    mov eax, r12d
    call flash_read
    mov ebx, eax
    and eax, 0xFFFF
    cmp eax, 0x55AA
    jne vs_scan_end
    lea eax, [r12d + 8]
    call flash_read
    mov r8d, eax                 ; name_size
    lea eax, [r12d + 12]
    call flash_read
    mov r9d, eax                 ; data_size
    cmp r8d, r15d
    ja vs_corrupt
    cmp r9d, r15d
    ja vs_corrupt
    shr ebx, 16
    and ebx, 0xFF
    cmp ebx, 0x3F                ; VAR_ADDED
    jne vs_next
    movabs rsi, name_bootcount
    movabs rdi, guid_snaplab
    call rec_match
    test eax, eax
    jz vs_try_order
    mov r13d, r12d
vs_try_order:
    movabs rsi, name_bootorder
    movabs rdi, guid_global
    call rec_match
    test eax, eax
    jz vs_next
    mov r14d, r12d
vs_next:
    lea eax, [r8d + r9d + 32 + 7]
    and eax, 0xFFFFFFF8
    add r12d, eax
    jmp vs_scan
vs_corrupt:
    movabs rsi, msg_corrupt
    call puts
vs_scan_end:
    ; --- BootOrder ---
    test r14d, r14d
    jz vs_no_order
    movabs rsi, msg_bootorder
    call puts
    lea eax, [r14d + 52]
    call flash_read
    and eax, 0xFFFF
    call putdec
    mov al, 10
    call putc
vs_no_order:
    ; --- BootCount: read, +1, append, retire the old record ---
    xor ebx, ebx
    test r13d, r13d
    jz vs_have_count
    lea eax, [r13d + 52]
    call flash_read
    mov ebx, eax
vs_have_count:
    inc ebx
    lea eax, [r12d + 56]
    cmp eax, r15d
    jbe vs_append
    movabs rsi, msg_reclaim
    call puts
    call vs_reclaim
    jmp vs_scan_start
vs_append:
    mov ecx, r12d
    mov eax, 0xFF7F55AA          ; header valid only
    call flash_prog
    lea ecx, [r12d + 4]
    mov eax, 7                   ; NV | BS | RT
    call flash_prog
    lea ecx, [r12d + 8]
    mov eax, 20
    call flash_prog
    lea ecx, [r12d + 12]
    mov eax, 4
    call flash_prog
    movabs rsi, guid_snaplab
    xor edi, edi
vs_app_guid:
    lea ecx, [r12d + 16]
    add ecx, edi
    mov eax, dword ptr [rsi + rdi]
    call flash_prog
    add edi, 4
    cmp edi, 16
    jb vs_app_guid
    movabs rsi, name_bootcount
    xor edi, edi
vs_app_name:
    lea ecx, [r12d + 32]
    add ecx, edi
    mov eax, dword ptr [rsi + rdi]
    call flash_prog
    add edi, 4
    cmp edi, 20
    jb vs_app_name
    lea ecx, [r12d + 52]
    mov eax, ebx
    call flash_prog
    mov ecx, r12d
    mov eax, 0xFF3F55AA          ; VAR_ADDED
    call flash_prog
    test r13d, r13d
    jz vs_printed
    mov ecx, r13d
    mov eax, 0xFF3E55AA          ; VAR_DELETED
    call flash_prog
vs_printed:
    movabs rsi, msg_bootcount
    call puts
    mov eax, ebx
    call putdec
    mov al, 10
    call putc
    ret
vs_absent:
    movabs rsi, msg_novars
    call puts
    ret

; vs_format: erase every sector, write the store header
vs_format:
    xor ebx, ebx
vs_fmt_erase:
    mov eax, ebx
    call flash_erase
    add ebx, 0x1000
    cmp ebx, r15d
    jb vs_fmt_erase
    xor ecx, ecx
    mov eax, 0x53564E53
    call flash_prog
    mov ecx, 4
    mov eax, 1
    call flash_prog
    mov ecx, 8
    mov eax, r15d
    call flash_prog
    mov ecx, 12
    mov eax, 64
    call flash_prog
    ret

; vs_reclaim: copy live (VAR_ADDED) records to RAM at 0x40000, reformat, program them back
vs_reclaim:
    mov r12d, 64
    mov rdi, 0x40000
vs_rc_scan:
    lea eax, [r12d + 32]
    cmp eax, r15d
    ja vs_rc_write
    mov eax, r12d
    call flash_read
    mov ebx, eax
    and eax, 0xFFFF
    cmp eax, 0x55AA
    jne vs_rc_write
    lea eax, [r12d + 8]
    call flash_read
    mov r8d, eax
    lea eax, [r12d + 12]
    call flash_read
    lea r9d, [r8d + eax + 32 + 7]
    and r9d, 0xFFFFFFF8
    cmp r9d, r15d
    ja vs_rc_write
    shr ebx, 16
    and ebx, 0xFF
    cmp ebx, 0x3F
    jne vs_rc_skip
    xor ecx, ecx
vs_rc_copy:
    lea eax, [r12d + ecx]
    call flash_read
    mov dword ptr [rdi], eax
    add rdi, 4
    add ecx, 4
    cmp ecx, r9d
    jb vs_rc_copy
vs_rc_skip:
    add r12d, r9d
    jmp vs_rc_scan
vs_rc_write:
    mov r10, rdi
    call vs_format
    mov rsi, 0x40000
    mov ecx, 64
vs_rc_prog:
    cmp rsi, r10
    jae vs_rc_done
    mov eax, dword ptr [rsi]
    call flash_prog
    add rsi, 4
    add ecx, 4
    jmp vs_rc_prog
vs_rc_done:
    ret

; include: common.inc is appended here by the build

msg_banner:
    .asciz "snaplab firmware 1.0\n"
msg_format:
    .asciz "varstore: no valid header, formatting\n"
msg_corrupt:
    .asciz "varstore: corrupt record, scan stopped\n"
msg_reclaim:
    .asciz "varstore: full, reclaiming\n"
msg_novars:
    .asciz "varstore: none\n"
msg_bootorder:
    .asciz "BootOrder: "
msg_bootcount:
    .asciz "BootCount: "
msg_start:
    .asciz "starting workload "
msg_badwl:
    .asciz "firmware: no such workload\n"
    .align 4
name_bootcount:
    .byte 0x42,0,0x6f,0,0x6f,0,0x74,0,0x43,0,0x6f,0,0x75,0,0x6e,0,0x74,0,0,0
name_bootorder:
    .byte 0x42,0,0x6f,0,0x6f,0,0x74,0,0x4f,0,0x72,0,0x64,0,0x65,0,0x72,0,0,0
guid_snaplab:
    .byte 0x6c,0x61,0x62,0x73,0x6e,0x61,0x70,0x00,0x9e,0x37,0x79,0xb9,0x7f,0x4a,0x7c,0x15
guid_global:
    .byte 0x61,0xdf,0xe4,0x8b,0xca,0x93,0xd2,0x11,0xaa,0x0d,0x00,0xe0,0x98,0x03,0x2b,0x8c
