; workloads.asm -- the guest programs, x86-64, loaded by the firmware at 0x100000.
; One entry per workload; the build splits this file at ";@workload NAME" markers, assembles
; each piece at 0x100000 with common.inc appended, and stores them in the firmware image.
;
; Lab page at 0x7000 (qwords): +0 iterations, +8 bytes dirtied, +16 disk ops, +24 errors,
; +32 workload id.  Published to the host by one OUT to the lab port per batch (lab_report).
; Data pages start at 0x200000; page p is stamped [+0] = generation (iteration + 1) and
; [+8] = p, so a restored snapshot can be checked page by page against splitmix64(seed + i).
; fw_cfg keys: 3 seed, 4 working-set bytes, 5 ns per batch (0 = unthrottled), 6 pattern
; (0 sequential, 1 random, 2 hot-cold), 7 disk sectors, 8 batch pages, 9 working-set offset
; (bytes from 0x200000 to the working set's first page; 0 = the working set starts at 0x200000).

;@workload idle
    mov rsp, 0x80000
    mov qword ptr [0x7020], 0
    xor r13, r13
idle_loop:
    hlt
    inc r13
    mov qword ptr [0x7000], r13
    call lab_report
    jmp idle_loop

;@workload dirty
    mov rsp, 0x80000
    mov qword ptr [0x7020], 1
    call dirty_setup
dirty_batch:
    call dirty_pages
    call dirty_publish
    call throttle
    jmp dirty_batch

;@workload disk
    mov rsp, 0x80000
    mov qword ptr [0x7020], 2
    call dirty_setup
disk_loop:
    call disk_op
    mov qword ptr [0x7000], r13
    inc r13
    call lab_report
    call throttle
    jmp disk_loop

;@workload mixed
    mov rsp, 0x80000
    mov qword ptr [0x7020], 3
    call dirty_setup
mixed_batch:
    call dirty_pages
    call dirty_publish
    call disk_op
    call throttle
    jmp mixed_batch

;@shared
; dirty_setup: r8 seed, r9 pages in the working set, r10 ns per batch, r11 pattern,
; r12 data base, r13 iteration, r14 sequential cursor, r15 next deadline, rbp batch pages
dirty_setup:
    mov eax, 3
    call fwcfg
    mov r8, rax
    mov eax, 4
    call fwcfg
    shr rax, 12
    jnz dirty_ws_ok
    mov eax, 1
dirty_ws_ok:
    mov r9, rax
    mov eax, 5
    call fwcfg
    mov r10, rax
    mov eax, 6
    call fwcfg
    mov r11, rax
    mov eax, 8
    call fwcfg
    mov rbp, rax
    test rbp, rbp
    jnz dirty_bp_ok
    mov ebp, 256
dirty_bp_ok:
    mov eax, 9
    call fwcfg
    add rax, 0x200000
    mov r12, rax
    xor r13, r13
    xor r14, r14
    call timer_now
    mov r15, rax
    mov qword ptr [0x7000], 0
    mov qword ptr [0x7008], 0
    mov qword ptr [0x7010], 0
    mov qword ptr [0x7018], 0
    ret

; dirty_pages: stamp rbp pages chosen by the pattern (the hot loop: no host calls)
dirty_pages:
    mov rcx, rbp
dp_loop:
    mov rax, r8
    add rax, r13
    movabs rdx, 0x9E3779B97F4A7C15
    add rax, rdx
    mov rdx, rax
    shr rdx, 30
    xor rax, rdx
    movabs rdx, 0xBF58476D1CE4E5B9
    imul rax, rdx
    mov rdx, rax
    shr rdx, 27
    xor rax, rdx
    movabs rdx, 0x94D049BB133111EB
    imul rax, rdx
    mov rdx, rax
    shr rdx, 31
    xor rax, rdx
    cmp r11, 1
    je dp_random
    cmp r11, 2
    je dp_hotcold
    mov rdx, r14
    inc r14
    cmp r14, r9
    jb dp_store
    xor r14, r14
    jmp dp_store
dp_random:
    mul r9
    jmp dp_store
dp_hotcold:
    mov rbx, rax
    shr rbx, 61
    jz dp_random
    mov rbx, r9
    shr rbx, 3
    jnz dp_hot_ok
    mov ebx, 1
dp_hot_ok:
    mul rbx
dp_store:
    mov rbx, rdx
    shl rdx, 12
    lea rax, [r13 + 1]
    mov qword ptr [r12 + rdx], rax
    mov qword ptr [r12 + rdx + 8], rbx
    inc r13
    dec rcx
    jnz dp_loop
    ret

dirty_publish:
    mov qword ptr [0x7000], r13
    mov rax, r13
    shl rax, 12
    mov qword ptr [0x7008], rax
    call lab_report
    ret

; throttle: with a rate, sleep until the next batch deadline (virtual clock)
throttle:
    test r10, r10
    jz throttle_done
    add r15, r10
    call timer_now
    cmp rax, r15
    jae throttle_late
    mov rax, r15
    call sleep_until
    ret
throttle_late:
    mov r15, rax
throttle_done:
    ret

; disk_op: write 8 sectors of a pattern derived from (seed, sector), read them back, compare.
; Descriptor at 0x1000: op u32, count u32, sector u64, buffer u64, status u32, unit u32.
disk_op:
    push rcx
    push rbx
    mov eax, 7
    call fwcfg
    cmp rax, 16
    jb disk_none
    sub rax, 8
    mov rbx, rax
    mov rax, r8
    add rax, r13
    not rax
    call splitmix
    mul rbx
    mov rbx, rdx                 ; sector
    xor ecx, ecx
disk_fill:
    mov rax, rbx
    shl rax, 6
    add rax, rcx
    xor rax, r8
    call splitmix
    mov qword ptr [0x180000 + rcx*8], rax
    inc ecx
    cmp ecx, 512
    jb disk_fill
    mov dword ptr [0x1000], 2
    mov dword ptr [0x1004], 8
    mov qword ptr [0x1008], rbx
    mov qword ptr [0x1010], 0x180000
    mov dword ptr [0x101C], 0
    call disk_go
    mov dword ptr [0x1000], 1
    mov qword ptr [0x1010], 0x190000
    call disk_go
    xor ecx, ecx
disk_cmp:
    mov rax, qword ptr [0x180000 + rcx*8]
    cmp rax, qword ptr [0x190000 + rcx*8]
    jne disk_bad
    inc ecx
    cmp ecx, 512
    jb disk_cmp
    ; A lab counter is loaded, incremented and stored, never incremented in memory: Unicorn
    ; checks for a stop after every memory access and, on one, restarts the instruction that
    ; made it, so an in-memory increment whose store had landed would count twice
    ; (docs/deviations.md; reference notes).  Storing the same register again is harmless.
    mov rax, qword ptr [0x7010]
    inc rax
    mov qword ptr [0x7010], rax
    pop rbx
    pop rcx
    ret
disk_bad:
    mov rax, qword ptr [0x7018]
    inc rax
    mov qword ptr [0x7018], rax
    push rsi
    movabs rsi, msg_disk_bad
    call puts
    pop rsi
disk_none:
    pop rbx
    pop rcx
    ret

disk_go:
    push rdx
    mov dword ptr [0x1018], 0xFFFFFFFF
    mov eax, 0x1000
    mov dx, 0x530
    out dx, eax
    xor eax, eax
    mov dx, 0x534
    out dx, eax
    mov dx, 0x538
    out dx, eax
    ; In flight until the device writes the status: a request the disk failed under
    ; werror=stop (or rerror=stop) completes only after the VM is resumed.
disk_go_wait:
    cmp dword ptr [0x1018], 0xFFFFFFFF
    jne disk_go_done
    pause
    jmp disk_go_wait
disk_go_done:
    cmp dword ptr [0x1018], 0
    je disk_go_ok
    mov rax, qword ptr [0x7018]
    inc rax
    mov qword ptr [0x7018], rax
disk_go_ok:
    pop rdx
    ret

msg_disk_bad:
    .asciz "disk: verify mismatch\n"
