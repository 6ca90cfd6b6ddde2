/* What the rootless relay (relay.py, relay_x86_64.S) executes once the test process exists: the
 * kernel charges the page faults of a process to the memory cgroup of its memory's owner, which
 * stays the relay, outside the test's cgroup, until the relay exits or executes something else.
 * Executing this makes the test process the owner: its cgroup's limits and accounting see them.
 * No libc. Waits for its only child, the test process, writes {0, its wait status} (two 32-bit
 * ints) to fd 0 (the relay put its report pipe there) and exits. Every signal stays blocked.
 */
	.text
	.globl _start
_start:
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
	mov $1, %eax             /* write(0, {0, status}, 8) */
	xor %edi, %edi
	mov %rsp, %rsi
	mov $8, %edx
	syscall
	mov $60, %eax            /* exit(0) */
	xor %edi, %edi
	syscall

name:	.asciz "isolate-relay"
