/* A rootless sandbox's holder, made from a template root: pytest_isolate/linux/holder.py.
 *
 * x86_64, no libc, position independent; wrapped like tinyinit in a one-segment ELF header. The
 * factory starts it with posix_spawn (no copy of the factory) instead of forking a Python holder;
 * it does what factory._holder_from_template does, in the same order:
 *
 * fd 0: its parameters (one block, then EOF)     fd 1: ready (the factory's; one 32-byte record)
 * fd 3, 4: the template's user and mount namespaces      fd 5: tinyinit's executable (a memfd)
 *
 * Parameters (offsets from the block's start, 8-byte fields): 0 unshare flags, 8 bring lo up,
 * 16 hostname length, 24 hostname, 32 tinyinit's path, 40 the new root, 48 argc, 56 argv: argc
 * offsets then a zero; strings after. The record: step (0: ready), errno, and for step 5 (the init
 * ended before it was ready) whether it exited and its status or signal.
 */
	.text
	.globl _start
_start:
	mov $157, %eax           /* prctl(PR_SET_PDEATHSIG, SIGKILL): die with the factory */
	mov $1, %edi
	mov $9, %esi
	syscall
	mov $157, %eax           /* prctl(PR_SET_NAME, "isolate-holder") */
	mov $15, %edi
	lea name(%rip), %rsi
	syscall
	sub $4096, %rsp          /* the block */
	mov %rsp, %rbx
	sub $256, %rsp           /* scratch: capabilities, pipes, a byte, ifreq, siginfo at 128 */
	xor %r12d, %r12d         /* bytes read */
params:
	xor %eax, %eax           /* read(0, block + n, 4096 - n) */
	xor %edi, %edi
	lea (%rbx,%r12), %rsi
	mov $4096, %edx
	sub %r12, %rdx
	jz parsed
	syscall
	cmp $-4, %rax
	je params
	test %rax, %rax
	js bad_params
	jz parsed
	add %rax, %r12
	jmp params
bad_params:
	mov $9, %r15d            /* step 9: the holder's parameters */
	jmp fail
parsed:
	mov 48(%rbx), %rcx       /* argv: offsets into pointers */
	lea 56(%rbx), %rsi
pointers:
	test %rcx, %rcx
	jz envp
	mov (%rsi), %rax
	add %rbx, %rax
	mov %rax, (%rsi)
	add $8, %rsi
	dec %rcx
	jmp pointers
envp:
	mov %rsi, %r13           /* argv's zero: an empty environment too */
	mov $1, %r15d            /* step 1: join the template's namespaces */
	mov $308, %eax           /* setns(3, CLONE_NEWUSER) */
	mov $3, %edi
	mov $0x10000000, %esi
	syscall
	test %rax, %rax
	js fail
	mov $308, %eax           /* setns(4, CLONE_NEWNS) */
	mov $4, %edi
	mov $0x20000, %esi
	syscall
	test %rax, %rax
	js fail
	mov $3, %eax             /* close(3), close(4); fd 5 close-on-exec: the init inherits none */
	mov $3, %edi
	syscall
	mov $3, %eax
	mov $4, %edi
	syscall
	mov $72, %eax            /* fcntl(5, F_SETFD, FD_CLOEXEC) */
	mov $5, %edi
	mov $2, %esi
	mov $1, %edx
	syscall
	mov $2, %r15d            /* step 2: unshare */
	mov $272, %eax
	mov (%rbx), %rdi
	syscall
	test %rax, %rax
	js fail
	mov $3, %r15d            /* step 3: keep CAP_SYS_ADMIN across exec (ambient) */
	movl $0x20080522, (%rsp) /* header: version 3, pid 0; data: 2 x {eff, perm, inh} at 8(%rsp) */
	movl $0, 4(%rsp)
	mov $125, %eax           /* capget(header, data) */
	mov %rsp, %rdi
	lea 8(%rsp), %rsi
	syscall
	test %rax, %rax
	js fail
	orl $0x200000, 16(%rsp)  /* inheritable |= 1 << CAP_SYS_ADMIN */
	mov $126, %eax           /* capset(header, data) */
	mov %rsp, %rdi
	lea 8(%rsp), %rsi
	syscall
	test %rax, %rax
	js fail
	mov $157, %eax           /* prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_SYS_ADMIN, 0, 0) */
	mov $47, %edi
	mov $2, %esi
	mov $21, %edx
	xor %r10d, %r10d
	xor %r8d, %r8d
	syscall
	test %rax, %rax
	js fail
	mov $4, %r15d            /* step 4: start the init */
	mov $293, %eax           /* pipe2(go, O_CLOEXEC) at 40(%rsp), pipe2(up, O_CLOEXEC) at 48(%rsp) */
	lea 40(%rsp), %rdi
	mov $0x80000, %esi
	syscall
	test %rax, %rax
	js fail
	mov $293, %eax
	lea 48(%rsp), %rdi
	mov $0x80000, %esi
	syscall
	test %rax, %rax
	js fail
	movq $0, 64(%rsp)        /* the child's execve errno (it shares our memory until it executes) */
	mov $58, %eax            /* vfork() */
	syscall
	test %rax, %rax
	js fail
	jz init_child
	mov %rax, %r14           /* the init */
	mov 64(%rsp), %rax
	test %rax, %rax
	jnz fail                 /* its execve failed (it exited); -errno */
	mov $3, %eax             /* close(go's read end), close(up's write end) */
	movslq 40(%rsp), %rdi
	syscall
	mov $3, %eax
	movslq 52(%rsp), %rdi
	syscall
	mov $1, %eax             /* write(go, "g", 1) */
	movslq 44(%rsp), %rdi
	lea gobyte(%rip), %rsi
	mov $1, %edx
	syscall
ready_read:
	xor %eax, %eax           /* read(up, byte, 1): "k" once /proc is mounted */
	movslq 48(%rsp), %rdi
	lea 72(%rsp), %rsi
	mov $1, %edx
	syscall
	cmp $-4, %rax
	je ready_read
	cmp $1, %rax
	jne init_gone
	cmpb $'k', 72(%rsp)
	jne init_gone
	mov $6, %r15d            /* step 6: build root: chdir(new); pivot_root(".", "."); umount2(".", MNT_DETACH); chdir("/") */
	mov $80, %eax
	mov 40(%rbx), %rdi
	add %rbx, %rdi
	syscall
	test %rax, %rax
	js fail
	mov $155, %eax
	lea dot(%rip), %rdi
	mov %rdi, %rsi
	syscall
	test %rax, %rax
	js fail
	mov $166, %eax
	lea dot(%rip), %rdi
	mov $2, %esi
	syscall
	test %rax, %rax
	js fail
	mov $80, %eax
	lea slash(%rip), %rdi
	syscall
	test %rax, %rax
	js fail
	mov $3, %eax             /* close(go), close(up's read end) */
	movslq 44(%rsp), %rdi
	syscall
	mov $3, %eax
	movslq 48(%rsp), %rdi
	syscall
	mov $7, %r15d            /* step 7: sethostname */
	mov $170, %eax
	mov 24(%rbx), %rdi
	add %rbx, %rdi
	mov 16(%rbx), %rsi
	syscall
	test %rax, %rax
	js fail
	cmpq $0, 8(%rbx)
	je done
	mov $8, %r15d            /* step 8: bring up lo */
	mov $41, %eax            /* socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0) */
	mov $2, %edi
	mov $0x80002, %esi
	xor %edx, %edx
	syscall
	test %rax, %rax
	js fail
	mov %rax, %r12
	movq $0, 80(%rsp)        /* ifreq at 80(%rsp): name "lo", then flags */
	movq $0, 88(%rsp)
	movq $0, 96(%rsp)
	movw $0x6f6c, 80(%rsp)
	mov $16, %eax            /* ioctl(sock, SIOCGIFFLAGS, &ifreq) */
	mov %r12, %rdi
	mov $0x8913, %esi
	lea 80(%rsp), %rdx
	syscall
	test %rax, %rax
	js fail
	orw $1, 96(%rsp)         /* IFF_UP */
	mov $16, %eax            /* ioctl(sock, SIOCSIFFLAGS, &ifreq) */
	mov %r12, %rdi
	mov $0x8914, %esi
	lea 80(%rsp), %rdx
	syscall
	test %rax, %rax
	js fail
	mov $3, %eax
	mov %r12, %rdi
	syscall
done:
	xor %r15d, %r15d         /* the record: ready */
	xor %eax, %eax
	movq $0, 16(%rsp)
	movq $0, 24(%rsp)
	call record
	mov $3, %eax             /* close(1): the factory sees the record and EOF */
	mov $1, %edi
	syscall
reap:
	mov $61, %eax            /* wait4(init, NULL, 0, NULL): then we end, and the factory reaps us */
	mov %r14, %rdi
	xor %esi, %esi
	xor %edx, %edx
	xor %r10d, %r10d
	syscall
	cmp $-4, %rax
	je reap
	xor %edi, %edi
	jmp exit

init_gone:                   /* step 5: the init ended before it was ready; waitid says how */
	mov $5, %r15d
	mov $247, %eax           /* waitid(P_PID, init, &siginfo, WEXITED | WNOWAIT, NULL) */
	mov $1, %edi
	mov %r14, %rsi
	lea 128(%rsp), %rdx
	mov $0x1000004, %r10d
	xor %r8d, %r8d
	syscall
	test %rax, %rax
	js fail
	xor %eax, %eax
	cmpl $1, 136(%rsp)       /* si_code: CLD_EXITED (1), else killed or dumped */
	sete %al
	mov %rax, 16(%rsp)
	movslq 152(%rsp), %rax   /* si_status: the exit status or the signal */
	mov %rax, 24(%rsp)
	xor %eax, %eax
	jmp failed
fail:                        /* %rax: -errno */
	neg %rax
	movq $0, 16(%rsp)
	movq $0, 24(%rsp)
failed:
	call record
	mov $1, %edi
exit:
	mov $231, %eax           /* exit_group */
	syscall

record:                      /* write(1, {step %r15, errno %rax, exited, status}, 32): the last two
	                          * at 16 and 24 of the caller's scratch, the first two put below them */
	mov %r15, 8(%rsp)        /* 8(%rsp) here is (%rsp) of the caller: its first scratch word */
	mov %rax, 16(%rsp)
	mov $1, %eax
	mov $1, %edi
	lea 8(%rsp), %rsi
	mov $32, %edx
	syscall
	ret

init_child:                  /* vfork's child: fd 0 go, fd 1 up, then tinyinit */
	mov $33, %eax            /* dup2(go's read end, 0) */
	movslq 40(%rsp), %rdi
	xor %esi, %esi
	syscall
	test %rax, %rax
	js child_failed
	mov $33, %eax            /* dup2(up's write end, 1) */
	movslq 52(%rsp), %rdi
	mov $1, %esi
	syscall
	test %rax, %rax
	js child_failed
	mov $59, %eax            /* execve(path, argv, envp) */
	mov 32(%rbx), %rdi
	add %rbx, %rdi
	lea 56(%rbx), %rsi
	mov %r13, %rdx
	syscall
child_failed:
	mov %rax, 64(%rsp)       /* seen by the holder, which vfork resumes when we exit */
	mov $60, %eax
	mov $127, %edi
	syscall

name:	.asciz "isolate-holder"
gobyte:	.ascii "g"
dot:	.asciz "."
slash:	.asciz "/"
