/* An experiment for benchmarks/native_relay.py (not part of the package): a rootless relay that
 * shares the caller's memory instead of copying it.
 *
 * Rootless, the test process must be born in the sandbox's PID namespace, which only a process in
 * the sandbox's user namespace may point its children into; the pytest process can't enter that
 * namespace and come back, so today a relay (a fork of pytest, page tables copied) joins it and
 * forks the test process. Here the relay is a clone(CLONE_VM) child running this code on a stack of
 * its own: it joins the namespaces, forks (a copy of the shared memory: the test process), reports
 * the pid, and waits for its exit. The test process returns 0 from relay() on the caller's stack,
 * as from fork(); the caller waits in read() until the relay has forked, so nothing in the shared
 * memory changes while it is copied.
 *
 * long relay(long *args), args (8-byte fields):
 *   0 fork     the function that forks (glibc's _Fork; see native_relay.py on glibc's fork)
 *   8 count    number of setns pairs          16 pairs  their address: (fd, nstype) each
 *  24 stack    top of the relay's stack       32 saved  our stack pointer (set here)
 *  40 result   the test process's pid, or -errno (set here)
 *  48 report   write end of a pipe: the pid (8 bytes), then wait status (4) + rusage (144)
 *  56 gate     its read end
 * Returns the relay's pid (the test process gets 0), or -errno if the clone failed.
 */
	.text
	.globl relay
relay:
	push %rbx
	push %rbp
	push %r12
	push %r13
	push %r14
	push %r15
	mov %rdi, %rbx
	mov %rsp, 32(%rbx)
	mov $56, %eax            /* clone(CLONE_VM | SIGCHLD, stack, 0, 0, 0) */
	mov $0x111, %edi
	mov 24(%rbx), %rsi
	xor %edx, %edx
	xor %r10d, %r10d
	xor %r8d, %r8d
	syscall
	test %rax, %rax
	jz child
	js out
	mov %rax, %r12
	sub $8, %rsp
again:
	xor %eax, %eax           /* read(gate, sp, 8) */
	mov 56(%rbx), %edi
	mov %rsp, %rsi
	mov $8, %edx
	syscall
	cmp $-4, %rax            /* EINTR */
	je again
	cmp $8, %rax
	jne lost
	mov (%rsp), %rax
	mov %rax, 40(%rbx)
	jmp back
lost:
	movq $-32, 40(%rbx)      /* EPIPE: the relay died before it said */
back:
	add $8, %rsp
	mov %r12, %rax
out:
	pop %r15
	pop %r14
	pop %r13
	pop %r12
	pop %rbp
	pop %rbx
	ret

child:
	mov $157, %eax           /* prctl(PR_SET_PDEATHSIG, SIGKILL) */
	mov $1, %edi
	mov $9, %esi
	syscall
	mov 16(%rbx), %r12
	mov 8(%rbx), %r13
joins:
	test %r13, %r13
	jz forkit
	mov $308, %eax           /* setns(fd, nstype) */
	mov (%r12), %rdi
	mov 8(%r12), %rsi
	syscall
	test %rax, %rax
	js say
	add $16, %r12
	dec %r13
	jmp joins
forkit:
	and $-16, %rsp
	call *(%rbx)
	test %eax, %eax
	jz test_process
	movslq %eax, %rax
	jns say
	mov $-11, %rax           /* EAGAIN */
say:
	mov %rax, %r14
	sub $160, %rsp
	mov %rax, (%rsp)
	mov $1, %eax             /* write(report, &pid, 8) */
	mov 48(%rbx), %edi
	mov %rsp, %rsi
	mov $8, %edx
	syscall
	test %r14, %r14
	js done
	mov $14, %eax            /* rt_sigprocmask(SIG_BLOCK, all, NULL, 8) */
	xor %edi, %edi
	lea all(%rip), %rsi
	xor %edx, %edx
	mov $8, %r10d
	syscall
	movl $-1, 12(%rsp)       /* the status stays -1 if the wait fails */
reap:
	mov $61, %eax            /* wait4(pid, &status, 0, &rusage) */
	mov %r14, %rdi
	lea 12(%rsp), %rsi
	xor %edx, %edx
	lea 16(%rsp), %r10
	syscall
	cmp $-4, %rax
	je reap
	mov $1, %eax             /* write(report, &status, 4 + 144) */
	mov 48(%rbx), %edi
	lea 12(%rsp), %rsi
	mov $148, %edx
	syscall
done:
	mov $60, %eax            /* exit(0) */
	xor %edi, %edi
	syscall

test_process:                /* back on the caller's stack (our copy of it), returning 0 */
	mov 32(%rbx), %rsp
	xor %eax, %eax
	jmp out

	.balign 8
all:	.quad -1
