/* The rootless relay (relay.py): a clone(CLONE_VM) child of the caller that shares its memory,
 * joins a sandbox's namespaces on a stack of its own and forks the test process with glibc's fork
 * (pthread_atfork handlers included). The test process returns 0 from relay() on its copy of the
 * caller's stack, as from fork(); the caller gets the relay's pid once the test process exists.
 *
 * long relay(long *args), args (8-byte fields, read-only here except saved/value/stage):
 *   0 fork     glibc's fork               8 count   setns pairs     16 pairs  (fd, nstype) each
 *  24 stack    top of the relay's stack  32 saved   caller's stack pointer (set here)
 *  40 value    the test process's pid or -errno (set by the relay through the pipe)
 *  48 stage    0 forked, 1 setns failed, 2 fork failed, 3 the relay died before it said
 *  56 report   write end of a pipe: value+stage (16 bytes), later wait status (4) + rusage (144)
 *  64 gate     its read end          72 busy    a 32-bit word the kernel zeroes when the relay exits
 *  80 errno    glibc's __errno_location  88 rseq offset from the thread pointer  96 rseq length
 * 104 before   PyOS_BeforeFork   112 parent  PyOS_AfterFork_Parent   120 child  PyOS_AfterFork_Child
 * 128 said     0; set to 1 by the relay once value+stage are in the pipe, and woken (a futex)
 * The caller waits on ``said`` (checking ``busy`` every 50 ms: a relay that died never says), not
 * in a read of the pipe: a pipe write wakes its reader as a "sync" wakeup, which the scheduler
 * places on the writer's core, behind the test process just forked there, while another core may
 * idle (seen with perf sched). A futex wake lets it pick an idle core.
 * CPython's fork hooks are called here, as os.fork calls them from C: between a return to Python
 * and PyOS_AfterFork_Child the test process could see another thread's request for the GIL (copied
 * at the fork), drop the GIL and wait forever for a thread it doesn't have.
 * The caller blocks all signals around the call (the relay and the test process inherit that mask).
 * Returns the relay's pid (the test process gets 0), or -errno if the clone failed, in which case
 * the report end is still the caller's to close; after a clone the caller's copy is closed here.
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
	sub $8, %rsp             /* PyOS_BeforeFork(), on a 16-byte aligned stack */
	call *104(%rbx)
	add $8, %rsp
	mov %rsp, 32(%rbx)
	mov $56, %eax            /* clone(CLONE_VM | CLONE_CHILD_CLEARTID | SIGCHLD, stack, 0, busy, 0) */
	mov $0x200111, %edi
	mov 24(%rbx), %rsi
	xor %edx, %edx
	mov 72(%rbx), %r10
	xor %r8d, %r8d
	syscall
	test %rax, %rax
	jz relay_process
	mov %rax, %r12
	js parent                /* no clone: the report end is still the caller's */
	mov $3, %eax             /* close(report): EOF at the gate if the relay dies before it says */
	mov 56(%rbx), %edi
	syscall
waiting:
	cmpl $0, 128(%rbx)       /* said: value+stage are in the pipe */
	jne again
	mov 72(%rbx), %rax
	cmpl $0, (%rax)          /* the relay is gone without saying: the read sees EOF */
	je again
	mov $202, %eax           /* futex(&said, FUTEX_WAIT_PRIVATE, 0, {0 s, 50 ms}) */
	lea 128(%rbx), %rdi
	mov $128, %esi
	xor %edx, %edx
	lea fifty_ms(%rip), %r10
	syscall
	jmp waiting
again:
	xor %eax, %eax           /* read(gate, &value, 16) */
	mov 64(%rbx), %edi
	lea 40(%rbx), %rsi
	mov $16, %edx
	syscall
	cmp $-4, %rax            /* EINTR */
	je again
	cmp $16, %rax
	je said
	movq $-32, 40(%rbx)      /* EPIPE */
	movq $3, 48(%rbx)
said:
parent:
	sub $8, %rsp             /* PyOS_AfterFork_Parent() */
	call *112(%rbx)
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

relay_process:               /* on the relay's stack; nothing of args is read after the pid is said */
	mov $157, %eax           /* prctl(PR_SET_PDEATHSIG, SIGKILL) */
	mov $1, %edi
	mov $9, %esi
	syscall
	mov 56(%rbx), %r15       /* report */
	mov $3, %eax             /* close(gate) */
	mov 64(%rbx), %edi
	syscall
	mov 16(%rbx), %r12
	mov 8(%rbx), %r13
	mov $1, %ebp             /* stage */
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
	mov $2, %ebp
	and $-16, %rsp
	call *(%rbx)
	test %eax, %eax
	jz test_process
	movslq %eax, %rax
	jns forked
	call *80(%rbx)           /* __errno_location(): ours is the caller's thread's */
	movslq (%rax), %rax
	neg %rax
	jmp say
forked:
	xor %ebp, %ebp
say:
	mov %rax, %r14
	sub $160, %rsp
	mov %rax, (%rsp)
	mov %rbp, 8(%rsp)
	mov $1, %eax             /* write(report, {value, stage}, 16) */
	mov %r15, %rdi
	mov %rsp, %rsi
	mov $16, %edx
	syscall
	movl $1, 128(%rbx)       /* said (args live until the caller sees this) */
	mov $202, %eax           /* futex(&said, FUTEX_WAKE_PRIVATE, 1): only the address is used */
	lea 128(%rbx), %rdi
	mov $129, %esi
	mov $1, %edx
	syscall
	test %r14, %r14
	js done
	mov $157, %eax           /* prctl(PR_SET_NAME, "isolate-relay") */
	mov $15, %edi
	lea name(%rip), %rsi
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
	mov %r15, %rdi
	lea 12(%rsp), %rsi
	mov $148, %edx
	syscall
done:
	mov $60, %eax            /* exit(0) */
	xor %edi, %edi
	syscall

test_process:                /* our own copy of everything now */
	mov $3, %eax             /* close(report) */
	mov %r15, %rdi
	syscall
	mov 96(%rbx), %rsi       /* the kernel forgets rseq across a CLONE_VM clone: register again */
	test %rsi, %rsi
	jz back
	mov %fs:0, %rdi
	add 88(%rbx), %rdi
	xor %edx, %edx
	mov $0x53053053, %r10d
	mov $334, %eax
	syscall
	test %rax, %rax
	jz back
	movl $-2, 4(%rdi)        /* cpu_id = RSEQ_CPU_ID_REGISTRATION_FAILED: glibc asks the kernel */
back:
	mov 32(%rbx), %rsp       /* the caller's stack (our copy of it), returning 0 */
	sub $8, %rsp             /* PyOS_AfterFork_Child() before any Python runs here */
	call *120(%rbx)
	add $8, %rsp
	xor %eax, %eax
	jmp out

	.balign 8
fifty_ms:	.quad 0, 50000000
name:	.asciz "isolate-relay"
