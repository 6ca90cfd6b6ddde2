/* The rootless relay (relay.py). The caller forks with glibc's fork (pthread_atfork handlers and
 * CPython's fork hooks included, as os.fork) and goes on at once. Its child, the relay, joins the
 * sandbox's namespaces and makes the test process with clone(CLONE_VM): no second copy of the
 * caller's memory, the relay's is shared. The test process returns 0 from relay() on the stack
 * the call was made on, as from fork(); the relay moves to a stack of its own before the clone,
 * then waits for the test process and reports how it ended.
 *
 * long relay(long *args), args (8-byte fields, read only):
 *   0 fork     glibc's fork               8 count   setns pairs     16 pairs  (fd, nstype) each
 *  24 stack    top of a stack the relay alone uses (the test process never touches it)
 *  32 report   write end of a pipe: the relay writes {stage, value} (two 32-bit ints) there once:
 *              stage 0 and the test process's wait status when it is gone, or stage 1 (setns)
 *              or 2 (clone) and the errno when it could not start it
 *  40 gate     its read end (the caller's; closed here in the relay)
 *  48 tid      glibc's copy of this thread's TID (the kernel writes the test process's there)
 *  56 errno    glibc's __errno_location  64 rseq offset from the thread pointer  72 rseq length
 *  80 before   PyOS_BeforeFork   88 parent  PyOS_AfterFork_Parent   96 child  PyOS_AfterFork_Child
 * 104 waiter   a memfd of the waiter below as a program: once the test process exists the
 *              relay executes it (the report pipe as its fd 0), so that the memory it shared
 *              with the test process is the test process's alone and charged to its cgroup (the
 *              kernel charges page faults to the memory's owner). -1 (no cgroup of its own to
 *              charge), or if the exec fails: the relay runs the waiter's code itself.
 * Returns the relay's pid in the caller, or -errno if the fork failed; 0 in the test process.
 * The caller blocks all signals around the call: the relay keeps them blocked (no handler may run
 * in memory the test process shares), the test process and the caller unblock them.
 * CPython's fork hooks are called here, as os.fork calls them from C: Before and Parent in the
 * caller; Child in the test process only, before any Python runs there (the relay runs none).
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
	call *80(%rbx)
	call *(%rbx)             /* fork() */
	test %eax, %eax
	jz relay_process
	movslq %eax, %r12
	test %r12, %r12
	jns parent
	call *56(%rbx)           /* __errno_location() */
	movslq (%rax), %r12
	neg %r12
parent:
	call *88(%rbx)           /* PyOS_AfterFork_Parent() */
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

relay_process:               /* a copy of the caller; nothing of it runs but this code */
	add $8, %rsp
	mov $157, %eax           /* prctl(PR_SET_PDEATHSIG, SIGKILL) */
	mov $1, %edi
	mov $9, %esi
	syscall
	mov $218, %eax           /* set_tid_address(NULL): glibc's fork has the kernel zero its TID */
	xor %edi, %edi           /* word at our exit or exec; after the clone that word is the test */
	syscall                  /* process's (which the kernel also writes its TID to) */
	mov $273, %eax           /* set_robust_list(NULL, 24): the list in memory is the test process's too */
	xor %edi, %edi
	mov $24, %esi
	syscall
	mov $3, %eax             /* close(gate) */
	mov 40(%rbx), %edi
	syscall
	mov 32(%rbx), %r15       /* report */
	mov 16(%rbx), %r12
	mov 8(%rbx), %r13
	mov $1, %ebp             /* stage */
joins:
	test %r13, %r13
	jz cloneit
	mov $308, %eax           /* setns(fd, nstype) */
	mov (%r12), %rdi
	mov 8(%r12), %rsi
	syscall
	test %rax, %rax
	js failed
	add $16, %r12
	dec %r13
	jmp joins
cloneit:
	mov 72(%rbx), %rsi       /* the test process registers rseq again: none of ours on it */
	test %rsi, %rsi
	jz no_rseq
	mov %fs:0, %rdi
	add 64(%rbx), %rdi
	mov $1, %edx             /* RSEQ_FLAG_UNREGISTER */
	mov $0x53053053, %r10d
	mov $334, %eax
	syscall
no_rseq:
	mov 104(%rbx), %r13      /* the waiter: nothing of args is read after the clone */
	mov $2, %ebp
	mov %rsp, %r12           /* the test process goes on on this stack; we leave it */
	mov 24(%rbx), %rsp
	mov $56, %eax            /* clone(CLONE_VM | CLONE_CHILD_SETTID | SIGCHLD, stack, 0, tid, 0) */
	mov $0x1000111, %edi
	mov %r12, %rsi
	xor %edx, %edx
	mov 48(%rbx), %r10
	xor %r8d, %r8d
	syscall
	test %rax, %rax
	jz test_process
	js failed
	test %r15, %r15          /* the test process: from now on it may change any memory but our stack */
	jnz move_report
	mov $72, %eax            /* fcntl(0, F_SETFD, 0): the report is fd 0 already; keep it open */
	xor %edi, %edi
	mov $2, %esi
	xor %edx, %edx
	syscall
	jmp moved
move_report:
	mov $33, %eax            /* dup2(report, 0), not closed on exec: the waiter's report */
	mov %r15, %rdi
	xor %esi, %esi
	syscall
moved:
	test %r13, %r13
	js waiter                /* nothing to charge: be the waiter here */
	push $0                  /* argv: {"isolate-relay", NULL} */
	lea name(%rip), %rax
	push %rax
	mov $322, %eax           /* execveat(waiter, "", argv, NULL, AT_EMPTY_PATH) */
	mov %r13, %rdi
	lea name+13(%rip), %rsi
	mov %rsp, %rdx
	xor %r10d, %r10d
	mov $0x1000, %r8d
	syscall
	add $16, %rsp
	jmp waiter               /* it failed: the same here */
failed:
	neg %eax
	sub $16, %rsp
	mov %ebp, (%rsp)
	mov %eax, 4(%rsp)
	mov $33, %eax            /* dup2(report, 0), where the waiter's code says it */
	mov %r15, %rdi
	xor %esi, %esi
	syscall
	jmp say

test_process:                /* on the caller's stack, in the relay's memory */
	mov $3, %eax             /* close(report) */
	mov %r15, %rdi
	syscall
	mov 72(%rbx), %rsi       /* the kernel forgets rseq across a CLONE_VM clone: register again */
	test %rsi, %rsi
	jz back
	mov %fs:0, %rdi
	add 64(%rbx), %rdi
	xor %edx, %edx
	mov $0x53053053, %r10d
	mov $334, %eax
	syscall
	test %rax, %rax
	jz back
	movl $-2, 4(%rdi)        /* cpu_id = RSEQ_CPU_ID_REGISTRATION_FAILED: glibc asks the kernel */
back:
	sub $8, %rsp             /* PyOS_AfterFork_Child() before any Python runs here */
	call *96(%rbx)
	add $8, %rsp
	xor %eax, %eax
	jmp out

/* The waiter, in the relay or as a program of its own: relay.py makes an executable of the code
 * from here to waiter_at (the memfd the relay executes). No libc, position-independent. Waits for
 * its only child, the test process, writes {0, its wait status} (two 32-bit ints) to fd 0 and
 * exits. Every signal stays blocked (the relay's mask survives the exec).
 */
waiter:
	mov $157, %eax           /* prctl(PR_SET_NAME, "isolate-relay"), for ps */
	mov $15, %edi
	lea name(%rip), %rsi
	syscall
	sub $16, %rsp
	movl $0, (%rsp)          /* stage 0: the status follows */
	movl $-1, 4(%rsp)        /* the status stays -1 if the wait fails */
reap:
	mov $61, %eax            /* wait4(-1, &status, 0, NULL) */
	mov $-1, %rdi
	lea 4(%rsp), %rsi
	xor %edx, %edx
	xor %r10d, %r10d
	syscall
	cmp $-4, %rax
	je reap
say:
	mov $1, %eax             /* write(0, {stage, value}, 8) */
	xor %edi, %edi
	mov %rsp, %rsi
	mov $8, %edx
	syscall
	mov $60, %eax            /* exit(0) */
	xor %edi, %edi
	syscall
name:	.asciz "isolate-relay"
	.balign 8
waiter_at:	.quad waiter - relay  /* the last 8 bytes: where the waiter starts */
