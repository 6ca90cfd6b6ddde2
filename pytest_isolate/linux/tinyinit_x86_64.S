/* The init (PID 1) of a sandbox built by the factory itself: pytest_isolate/linux/tinyinit.py.
 *
 * x86_64, no libc, position independent: tinyinit.py wraps these bytes (objcopy -O binary -j .text
 * of `as --64`) in a one-segment ELF header. tests/unit/test_tinyinit.py assembles this file again
 * and compares. Exit status: 125 when the factory's go byte never came, else the errno of mount.
 *
 * fd 0: the factory's go (one byte once the root is built, EOF if the factory died first);
 * fd 1: ready ("k" once every /proc in argv[1:] is mounted); both closed, with fd 2, afterwards.
 */
	.text
	.globl _start
_start:
	mov $157, %eax          /* prctl(PR_SET_PDEATHSIG, SIGKILL): die with the factory */
	mov $1, %edi
	mov $9, %esi
	syscall
	mov $157, %eax          /* prctl(PR_SET_NAME, "pytest_isolate"): what ps shows */
	mov $15, %edi
	lea name(%rip), %rsi
	syscall
	mov $14, %eax           /* rt_sigprocmask(SIG_BLOCK, &forwarded, NULL, 8) */
	xor %edi, %edi
	lea forwarded(%rip), %rsi
	xor %edx, %edx
	mov $8, %r10d
	syscall
	mov $13, %eax           /* rt_sigaction(SIGCHLD, &ignore, NULL, 8): the kernel reaps orphans */
	mov $17, %edi
	lea ignore(%rip), %rsi
	xor %edx, %edx
	mov $8, %r10d
	syscall
	push %rax               /* a byte of stack for the go byte */
	xor %eax, %eax          /* read(0, sp, 1): the factory's go; EOF if it died */
	xor %edi, %edi
	mov %rsp, %rsi
	mov $1, %edx
	syscall
	cmp $1, %rax
	mov $125, %edi
	jne exit
	lea 24(%rsp), %rbx      /* argv + 1: where to mount a /proc (argc at 8(%rsp) after the push) */
mounts:
	mov (%rbx), %rsi
	test %rsi, %rsi
	jz ready
	mov $165, %eax          /* mount("proc", *argv, "proc", MS_NOSUID|MS_NODEV|MS_NOEXEC, NULL) */
	lea proc(%rip), %rdi
	mov %rdi, %rdx
	mov $14, %r10d
	xor %r8d, %r8d
	syscall
	mov %eax, %edi
	neg %edi                /* exit status: the errno */
	test %eax, %eax
	jnz exit
	add $8, %rbx
	jmp mounts
ready:
	mov $1, %eax            /* write(1, "k", 1): ready */
	mov $1, %edi
	lea proc+5(%rip), %rsi
	mov $1, %edx
	syscall
	mov $2, %ebx            /* close(2), close(1), close(0) */
closing:
	mov $3, %eax
	mov %ebx, %edi
	syscall
	dec %ebx
	jns closing
wait:
	mov $128, %eax          /* rt_sigtimedwait(&forwarded, NULL, NULL, 8) */
	lea forwarded(%rip), %rdi
	xor %esi, %esi
	xor %edx, %edx
	mov $8, %r10d
	syscall
	test %eax, %eax
	jle wait
	mov %eax, %esi          /* kill(2, signal): forward it to the payload */
	mov $62, %eax
	mov $2, %edi
	syscall
	jmp wait
exit:
	mov $231, %eax          /* exit_group(status) */
	syscall
forwarded:
	.quad (1 << 0) | (1 << 1) | (1 << 14)   /* SIGHUP, SIGINT, SIGTERM */
ignore:
	.quad 1, 0, 0, 0        /* sa_handler = SIG_IGN, flags, restorer, mask */
proc:
	.ascii "proc\0k"
name:
	.asciz "pytest_isolate"
