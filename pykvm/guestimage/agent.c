/*
 * pykvm-agent: runs commands and moves files for the host, over a virtio-serial
 * port named org.pykvm.agent.0 (the protocol is in pykvm/agent.py's docstring).
 *
 * The default guest's /init starts it (/sbin/pykvm-agent) when the kernel
 * command line has pykvm.agent=1. It then:
 *   1. mounts each virtio disk whose serial starts with "pykvm-share" read-only
 *      at /mnt/<serial without "pykvm-"> (pykvm run --share DIR: /mnt/share);
 *   2. finds its port in /sys/class/virtio-ports/<dev>/name (waiting up to 60 s
 *      for the driver to add it) and opens /dev/<dev>;
 *   3. sends READY and serves requests until the port goes away.
 *
 * One process, one poll() loop, no threads: on kvm_pvm hosts every system call
 * costs milliseconds, so the loop moves data in 64 KiB chunks and forks only to
 * run the commands themselves. Each command runs in its own session (so a
 * timeout can kill its whole process group) with pipes for stdin, stdout and
 * stderr; its exit is seen through a signalfd for SIGCHLD.
 *
 * Options (for running it by hand, and for the host-side tests):
 *   --device PATH   use this file instead of looking for the port
 *   --fd N          use the already open descriptor N (a socket in the tests)
 *   --no-mount      do not mount share disks
 *   --vsock-listen PORT [--once]
 *                   serve the protocol over virtio-vsock instead: listen on guest port
 *                   PORT (pykvm run --vsock; the host connects to the device's socket
 *                   and writes "CONNECT PORT\n", Firecracker's convention), one forked
 *                   agent per connection; with --once, serve the first one and exit
 *   --vsock-connect PORT
 *                   dial host port PORT (CID 2: the host's <uds_path>_PORT socket) and
 *                   serve the protocol there until the host closes it
 *
 * The zygote. Starting a process costs seconds where guest ring 0 is emulated
 * (kvm_pvm): the fork, the exec and every page fault and system call of the new
 * program go through the emulated kernel. So before READY the agent starts the
 * shell for the first command: a child already in `sh -c '. /proc/self/fd/3'`,
 * on stdin /dev/null, stdout and stderr on pipes, blocked reading its script
 * from a pipe on fd 3 (the agent waits until it closed fd 4: its exec and start-
 * up are done). A boot cached at READY (pykvm/warm) holds that shell, so a
 * restored run hands its command to a running process. The first EXEC that such
 * a shell runs as `sh -c` would (SHELL, no stdin, no environment, in /, at most
 * ZYGOTE_MAX bytes) is written to the pipe after `exec 3<&-` (the command does
 * not inherit it) and the pipe closed; the shell runs it and exits with its
 * status, which its EXIT trap also writes to a pipe on fd 5: the agent reports
 * EXIT from there at once instead of waiting for the SIGCHLD, which comes only
 * after the kernel has torn the process down (about a second of emulated ring 0
 * here). What differs from `sh -c`: a syntax error's message names the script
 * /proc/self/fd/3, an external last command is forked, not exec'd in place, and
 * fd 5 is open in the command (a command that sets its own EXIT trap, or is
 * killed, is reported by waitpid as any other). Every other EXEC, and every one
 * after it, forks as before.
 *
 * REFRESH (a frame: u64 seconds, u32 nanoseconds, up to 512 bytes of the host's
 * randomness) does what --refresh below does, in the agent, and answers OK or
 * ERROR: the refresh of a restored boot then costs no process at all.
 *
 * pykvm-agent --refresh SECONDS NANOSECONDS [COMMAND_LINE] (run by the host through
 * EXEC, with up to 512 bytes of the host's randomness on stdin) makes a guest
 * restored from a cached boot (pykvm/warm/guest.py) as fresh as a booted one: it
 * mixes the bytes into the kernel's input pool and credits them (RNDADDENTROPY),
 * forces the CRNG to reseed from it (RNDRESEEDCRNG: crediting alone does not reseed
 * a CRNG that is already initialised, so two guests restored from one snapshot
 * would read the same /dev/urandom bytes), and sets the wall clock (CLOCK_REALTIME)
 * to the host's. With COMMAND_LINE it then becomes `sh -c COMMAND_LINE` with stdin
 * on /dev/null, as any EXEC'd shell command: one fork in the guest, not two (each
 * costs about a second where guest ring 0 is emulated). When the refresh fails it
 * exits REFRESH_FAILED (125) with a "pykvm-agent: refresh:" line on stderr, and the
 * command does not run.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.pykvm.agent.0"
#define PORTS_DIR "/sys/class/virtio-ports"
#define BLOCK_DIR "/sys/block"
#define SHARE_PREFIX "pykvm-share"
#define AGENT_TEXT "pykvm-agent 1"
#define PROTOCOL_VERSION 1
#define PORT_WAIT_SECONDS 60

enum {
	MAGIC = 0x4B50,
	HEADER_SIZE = 12,
	MAX_PAYLOAD = 1 << 20,
	CHUNK = 64 * 1024,
	MAX_SESSIONS = 16,
	MAX_PUTS = 8,
	MAX_STRINGS = 4096,
};

enum {
	T_EXEC = 0x01, T_STDIN = 0x02, T_SIGNAL = 0x03, T_PUT_FILE = 0x04, T_GET_FILE = 0x05,
	T_DATA = 0x06, T_PING = 0x07, T_REFRESH = 0x08,
	T_READY = 0x81, T_STDOUT = 0x82, T_STDERR = 0x83, T_EXIT = 0x84, T_OK = 0x85,
	T_ERROR = 0x86, T_FILE_INFO = 0x87, T_PONG = 0x88,
};

enum { EXEC_SHELL = 1, EXEC_STDIN = 2 };

struct session {
	int used;
	uint32_t id;
	pid_t pid;
	int out, err, in;         /* our ends of the pipes; -1 when closed */
	int done;                 /* the zygote's status pipe (see there); -1 when none */
	int exited, status;
	unsigned char *input;     /* stdin bytes not yet written */
	size_t input_len, input_off;
	int input_end;            /* the host closed stdin: close the pipe once drained */
};

struct put {
	int used;
	uint32_t id;
	int fd, error;
	char *path, *part;
	mode_t mode;
};

static struct session sessions[MAX_SESSIONS];
static struct put transfers[MAX_PUTS];
static int channel = -1;
/* /dev/urandom, opened once before READY: a REFRESH after a restore then makes two
 * system calls fewer (tens of milliseconds each on a loaded kvm_pvm host). */
static int urandom_fd = -1;
static unsigned char out_frame[HEADER_SIZE + CHUNK];

static void say(const char *format, ...)
{
	char line[512];
	va_list args;
	int length = snprintf(line, sizeof line, "pykvm-agent: ");

	va_start(args, format);
	length += vsnprintf(line + length, sizeof line - (size_t)length - 1, format, args);
	va_end(args);
	if (length > (int)sizeof line - 2)
		length = (int)sizeof line - 2;
	line[length++] = '\n';
	if (write(STDERR_FILENO, line, (size_t)length) < 0) {
		/* nowhere else to say it */
	}
}

/* --- the channel ----------------------------------------------------------------------- */

static void write_all(int fd, const unsigned char *data, size_t length)
{
	while (length > 0) {
		ssize_t done = write(fd, data, length);
		if (done > 0) {
			data += done;
			length -= (size_t)done;
			continue;
		}
		if (done < 0 && errno == EINTR)
			continue;
		if (done < 0 && errno == EAGAIN) {
			struct pollfd wait_out = { .fd = fd, .events = POLLOUT };
			poll(&wait_out, 1, -1);
			continue;
		}
		say("the channel is gone (write: %s)", done < 0 ? strerror(errno) : "0 bytes");
		exit(1);
	}
}

static void put_le16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void put_le32(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}
static void put_le64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_le32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void header(unsigned char *h, int type, uint32_t id, uint32_t length)
{
	put_le16(h, MAGIC);
	h[2] = (unsigned char)type;
	h[3] = 0;
	put_le32(h + 4, id);
	put_le32(h + 8, length);
}

/* One frame, in one write() when it fits (each write is a system call). */
static void send_frame(int type, uint32_t id, const void *payload, size_t length)
{
	if (length <= CHUNK) {
		header(out_frame, type, id, (uint32_t)length);
		if (length && payload != out_frame + HEADER_SIZE)
			memcpy(out_frame + HEADER_SIZE, payload, length);
		write_all(channel, out_frame, HEADER_SIZE + length);
		return;
	}
	unsigned char h[HEADER_SIZE];
	header(h, type, id, (uint32_t)length);
	write_all(channel, h, sizeof h);
	write_all(channel, payload, length);
}

static void send_error(uint32_t id, int error, const char *format, ...)
{
	unsigned char payload[4 + 400];
	va_list args;

	put_le32(payload, (uint32_t)error);
	va_start(args, format);
	int length = vsnprintf((char *)payload + 4, sizeof payload - 4, format, args);
	va_end(args);
	if (length < 0)
		length = 0;
	if (length > (int)sizeof payload - 5)
		length = (int)sizeof payload - 5;
	send_frame(T_ERROR, id, payload, 4 + (size_t)length);
}

static void send_exit(uint32_t id, int status)
{
	unsigned char payload[4];
	put_le32(payload, (uint32_t)status);
	send_frame(T_EXIT, id, payload, sizeof payload);
}

/* --- sessions (commands) ----------------------------------------------------------------- */

static struct session *find_session(uint32_t id)
{
	for (int i = 0; i < MAX_SESSIONS; i++)
		if (sessions[i].used && sessions[i].id == id)
			return &sessions[i];
	return NULL;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void set_nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	if (flags >= 0)
		fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/* In the child: become the command. Never returns. */
static void __attribute__((noreturn))
run_child(int flags, char **argv, char **env, int envc, const char *cwd, int in, int out, int err)
{
	sigset_t none;

	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	setsid();
	if (in < 0)
		in = open("/dev/null", O_RDONLY);
	if (in >= 0 && in != STDIN_FILENO)
		dup2(in, STDIN_FILENO);
	dup2(out, STDOUT_FILENO);
	dup2(err, STDERR_FILENO);
	for (int i = 0; i < envc; i++)
		putenv(env[i]);
	if (chdir(*cwd ? cwd : "/") < 0) {
		dprintf(STDERR_FILENO, "pykvm-agent: cannot enter %s: %s\n", cwd, strerror(errno));
		_exit(126);
	}
	if (flags & EXEC_SHELL)
		execl("/bin/sh", "sh", "-c", argv[0], (char *)NULL);
	else
		execvp(argv[0], argv);
	int error = errno;
	dprintf(STDERR_FILENO, "pykvm-agent: cannot run %s: %s\n",
		flags & EXEC_SHELL ? "/bin/sh" : argv[0], strerror(error));
	_exit(error == ENOENT ? 127 : 126);
}

/* --- the zygote (see the comment at the top) ----------------------------------------- */

/* Every guest system call counts here (tens of milliseconds on a loaded kvm_pvm host),
 * so what can happen at start-up does: the prelude is written with the script, run
 * before READY; the trap's `exec >&5` costs one dup2 where `echo >&5` would save and
 * restore stdout (four calls); the agent's ends of the pipes are made non-blocking
 * here, not at the EXEC. */
#define ZYGOTE_SCRIPT "trap '_pykvm_status=$?; exec >&5; echo $_pykvm_status' EXIT; " \
		      ". /proc/self/fd/3"
#define ZYGOTE_PRELUDE "exec 3<&- 4>&-\n"       /* the pipe, and fd 4: "started" */
#define ZYGOTE_MAX 4096                 /* the command in one atomic pipe write */
#define ZYGOTE_START_MS (300 * 1000)    /* minutes under load where ring 0 is emulated */

static struct { pid_t pid; int script, out, err, done; } zygote = { 0, -1, -1, -1, -1 };

static void drop_zygote(int kill_it)
{
	if (zygote.pid > 0 && kill_it)
		kill(zygote.pid, SIGKILL);     /* reap() collects it */
	zygote.pid = 0;
	close_fd(&zygote.script);
	close_fd(&zygote.out);
	close_fd(&zygote.err);
	close_fd(&zygote.done);
}

/* Start the zygote and wait until its shell runs; without /proc (the script is read
 * through /proc/self/fd/3) or when anything fails there is none, and EXECs fork. */
static void start_zygote(void)
{
	int script[2], started[2], out[2], err[2], done[2];

	if (access("/proc/self/fd/0", F_OK) < 0 || access("/bin/sh", X_OK) < 0)
		return;
	if (pipe2(script, O_CLOEXEC) < 0)
		return;
	if (pipe2(started, O_CLOEXEC) < 0) {
		close(script[0]);
		close(script[1]);
		return;
	}
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 || pipe2(done, O_CLOEXEC) < 0) {
		say("zygote: pipe: %s", strerror(errno));
		return;   /* (leaks: only when out of descriptors) */
	}
	pid_t pid = fork();
	if (pid == 0) {
		/* above 9 first, so that placing fds 3-5 clobbers none of them */
		int from[5] = { script[0], started[1], out[1], err[1], done[1] };
		for (int i = 0; i < 5; i++)
			from[i] = fcntl(from[i], F_DUPFD_CLOEXEC, 10);
		if (dup2(from[0], 3) < 0 || dup2(from[1], 4) < 0 || dup2(from[4], 5) < 0)
			_exit(126);
		char *argv[] = { ZYGOTE_SCRIPT, NULL };
		run_child(EXEC_SHELL, argv, NULL, 0, "", -1, from[2], from[3]);
	}
	close(script[0]);
	close(started[1]);
	close(out[1]);
	close(err[1]);
	close(done[1]);
	if (pid < 0) {
		say("zygote: fork: %s", strerror(errno));
		close(script[1]);
		close(started[0]);
		close(out[0]);
		close(err[0]);
		close(done[0]);
		return;
	}
	zygote.pid = pid;
	zygote.script = script[1];
	zygote.out = out[0];
	zygote.err = err[0];
	zygote.done = done[0];
	set_nonblocking(zygote.out);
	set_nonblocking(zygote.err);
	set_nonblocking(zygote.done);
	/* its shell closes fd 4 once it has read the prelude through the script's pipe
	 * (an exec that failed closes it too) */
	if (write(zygote.script, ZYGOTE_PRELUDE, sizeof ZYGOTE_PRELUDE - 1) < 0)
		say("zygote: write: %s", strerror(errno));
	struct pollfd wait_started = { .fd = started[0], .events = POLLIN };
	int ready;
	while ((ready = poll(&wait_started, 1, ZYGOTE_START_MS)) < 0 && errno == EINTR) {
	}
	close(started[0]);
	int status;
	if (ready <= 0 || waitpid(pid, &status, WNOHANG) != 0) {
		say("zygote: its shell did not start");
		drop_zygote(1);
	}
}

/* Hand the command line to the zygote as session s; 0 when there is none to use. */
static int exec_in_zygote(struct session *s, uint32_t id, const char *command)
{
	size_t length = strlen(command);

	if (zygote.pid <= 0 || length > ZYGOTE_MAX)
		return 0;
	if (write(zygote.script, command, length) != (ssize_t)length) {   /* EPIPE: it died */
		drop_zygote(1);
		return 0;
	}
	memset(s, 0, sizeof *s);
	s->used = 1;
	s->id = id;
	s->pid = zygote.pid;
	s->out = zygote.out;
	s->err = zygote.err;
	s->in = -1;
	s->done = zygote.done;
	zygote.out = zygote.err = zygote.done = -1;
	drop_zygote(0);                 /* closes the script: the shell reads its end */
	return 1;
}

static void start_command(uint32_t id, unsigned char *payload, uint32_t length)
{
	if (find_session(id)) {
		send_error(id, EEXIST, "request %u is already running", id);
		return;
	}
	struct session *s = NULL;
	for (int i = 0; i < MAX_SESSIONS && !s; i++)
		if (!sessions[i].used)
			s = &sessions[i];
	if (!s) {
		send_error(id, EAGAIN, "%d commands are running already", MAX_SESSIONS);
		return;
	}
	if (length < 12 || payload[length - 1] != '\0') {
		send_error(id, EINVAL, "malformed EXEC");
		return;
	}
	uint32_t flags = get_le32(payload), argc = get_le32(payload + 4), envc = get_le32(payload + 8);
	if (argc < 1 || argc > MAX_STRINGS || envc > MAX_STRINGS) {
		send_error(id, EINVAL, "EXEC with %u arguments and %u variables", argc, envc);
		return;
	}
	size_t count = argc + envc + 1;
	char **strings = calloc(count + 1, sizeof *strings);
	if (!strings) {
		send_error(id, ENOMEM, "out of memory");
		return;
	}
	char *p = (char *)payload + 12, *end = (char *)payload + length;
	size_t n = 0;
	while (n < count && p < end) {
		strings[n++] = p;
		p += strlen(p) + 1;
	}
	if (n != count || p != end) {
		free(strings);
		send_error(id, EINVAL, "EXEC strings do not match their counts");
		return;
	}
	/* argv must end with NULL for execvp: move the env and cwd out of the way. */
	char **argv = calloc(argc + 1, sizeof *argv);
	if (!argv) {
		free(strings);
		send_error(id, ENOMEM, "out of memory");
		return;
	}
	memcpy(argv, strings, argc * sizeof *argv);
	char **env = strings + argc;
	const char *cwd = strings[argc + envc];
	if (flags == EXEC_SHELL && envc == 0 && (!*cwd || strcmp(cwd, "/") == 0) &&
	    exec_in_zygote(s, id, argv[0])) {
		free(argv);
		free(strings);
		return;
	}

	int out[2], err[2], in[2] = { -1, -1 };
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0 ||
	    ((flags & EXEC_STDIN) && pipe2(in, O_CLOEXEC) < 0)) {
		int error = errno;
		send_error(id, error, "pipe: %s", strerror(error));
		free(argv);
		free(strings);
		return;   /* (the pipes that were made leak: only when out of descriptors) */
	}
	pid_t pid = fork();
	if (pid == 0)
		run_child((int)flags, argv, env, (int)envc, cwd, in[0], out[1], err[1]);
	int error = errno;
	close(out[1]);
	close(err[1]);
	if (in[0] >= 0)
		close(in[0]);
	free(argv);
	free(strings);
	if (pid < 0) {
		close(out[0]);
		close(err[0]);
		if (in[1] >= 0)
			close(in[1]);
		send_error(id, error, "fork: %s", strerror(error));
		return;
	}
	memset(s, 0, sizeof *s);
	s->used = 1;
	s->id = id;
	s->pid = pid;
	s->out = out[0];
	s->err = err[0];
	s->in = in[1];
	s->done = -1;
	set_nonblocking(s->out);
	set_nonblocking(s->err);
	if (s->in >= 0)
		set_nonblocking(s->in);
}

static void add_input(uint32_t id, const unsigned char *data, uint32_t length)
{
	struct session *s = find_session(id);
	if (!s || s->in < 0)
		return;            /* finished, or stdin closed: the bytes have nowhere to go */
	if (length == 0) {
		s->input_end = 1;
		if (s->input_len == s->input_off)
			close_fd(&s->in);
		return;
	}
	if (s->input_off > 0) {   /* compact */
		memmove(s->input, s->input + s->input_off, s->input_len - s->input_off);
		s->input_len -= s->input_off;
		s->input_off = 0;
	}
	unsigned char *grown = realloc(s->input, s->input_len + length);
	if (!grown) {
		say("out of memory for stdin of request %u: dropped", id);
		return;
	}
	s->input = grown;
	memcpy(s->input + s->input_len, data, length);
	s->input_len += length;
}

static void feed_input(struct session *s)
{
	while (s->in >= 0 && s->input_off < s->input_len) {
		ssize_t done = write(s->in, s->input + s->input_off, s->input_len - s->input_off);
		if (done > 0) {
			s->input_off += (size_t)done;
		} else if (done < 0 && errno == EINTR) {
			continue;
		} else if (done < 0 && errno == EAGAIN) {
			return;
		} else {        /* EPIPE: the command does not read any more */
			close_fd(&s->in);
			s->input_off = s->input_len;
		}
	}
	if (s->input_off == s->input_len) {
		free(s->input);
		s->input = NULL;
		s->input_len = s->input_off = 0;
		if (s->input_end)
			close_fd(&s->in);
	}
}

/* Read what a pipe has now; returns 0 at end of file or error (then the fd is closed). */
static int forward(uint32_t id, int *fd, int type, int until_empty)
{
	do {
		ssize_t got = read(*fd, out_frame + HEADER_SIZE, CHUNK);
		if (got > 0) {
			send_frame(type, id, out_frame + HEADER_SIZE, (size_t)got);
			continue;
		}
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0 && errno == EAGAIN)
			return 1;
		close_fd(fd);
		return 0;
	} while (until_empty);
	return 1;
}

static void finish_session(struct session *s)
{
	if (s->out >= 0)
		forward(s->id, &s->out, T_STDOUT, 1);
	if (s->err >= 0)
		forward(s->id, &s->err, T_STDERR, 1);
	int status = WIFSIGNALED(s->status) ? 128 + WTERMSIG(s->status) : WEXITSTATUS(s->status);
	send_exit(s->id, status);       /* first: the closes are not the host's wait */
	close_fd(&s->out);
	close_fd(&s->err);
	close_fd(&s->in);
	close_fd(&s->done);
	free(s->input);
	memset(s, 0, sizeof *s);
	s->out = s->err = s->in = s->done = -1;
}

/* The zygote's shell wrote its exit status (its EXIT trap): the command is over. Its
 * process still has to end, and ending it costs the guest's kernel a second or more
 * where ring 0 is emulated; its SIGCHLD, later, finds no session and is ignored. */
static void read_done(struct session *s)
{
	char text[16];
	ssize_t got = read(s->done, text, sizeof text - 1);
	if (got < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	close_fd(&s->done);
	if (got <= 0 || text[got - 1] != '\n')
		return;          /* no status (killed, or its own EXIT trap): waitpid tells */
	text[got - 1] = '\0';
	char *end;
	long status = strtol(text, &end, 10);
	if (*end || end == text || status < 0 || status > 255)
		return;
	s->exited = 1;
	s->status = (int)status << 8;       /* as waitpid's status: WEXITSTATUS is it */
}

static void reap(int signal_fd)
{
	struct signalfd_siginfo info[8];
	while (read(signal_fd, info, sizeof info) > 0) {
		/* drain: one SIGCHLD may stand for many children */
	}
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		if (pid == zygote.pid)
			drop_zygote(0);
		for (int i = 0; i < MAX_SESSIONS; i++) {
			if (sessions[i].used && sessions[i].pid == pid) {
				sessions[i].exited = 1;
				sessions[i].status = status;
			}
		}
	}
}

static void signal_command(uint32_t id, const unsigned char *payload, uint32_t length)
{
	struct session *s = find_session(id);
	if (!s || s->exited || length < 4)
		return;
	int number = (int)get_le32(payload);
	if (kill(-s->pid, number) < 0)
		kill(s->pid, number);
}

/* --- files ----------------------------------------------------------------------------------- */

static struct put *find_put(uint32_t id)
{
	for (int i = 0; i < MAX_PUTS; i++)
		if (transfers[i].used && transfers[i].id == id)
			return &transfers[i];
	return NULL;
}

static void start_put(uint32_t id, const unsigned char *payload, uint32_t length)
{
	struct put *t = NULL;
	for (int i = 0; i < MAX_PUTS && !t; i++)
		if (!transfers[i].used)
			t = &transfers[i];
	if (find_put(id) || !t || length < 6 || payload[length - 1] != '\0') {
		/* its DATA frames will find no transfer and be dropped */
		send_error(id, t ? EINVAL : EAGAIN, t ? "malformed PUT_FILE" : "too many transfers");
		return;
	}
	memset(t, 0, sizeof *t);
	t->used = 1;
	t->id = id;
	t->mode = get_le32(payload) & 07777;
	t->path = strdup((const char *)payload + 4);
	if (!t->path || asprintf(&t->part, "%s.pykvm-part", t->path) < 0) {
		t->part = NULL;
		t->error = ENOMEM;
		t->fd = -1;
		return;
	}
	t->fd = open(t->part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (t->fd < 0)
		t->error = errno;
}

static void put_data(uint32_t id, const unsigned char *data, uint32_t length)
{
	struct put *t = find_put(id);
	if (!t)
		return;
	if (length > 0) {
		while (t->fd >= 0 && !t->error && length > 0) {
			ssize_t done = write(t->fd, data, length);
			if (done < 0 && errno == EINTR)
				continue;
			if (done <= 0) {
				t->error = done < 0 ? errno : ENOSPC;
				break;
			}
			data += done;
			length -= (uint32_t)done;
		}
		return;
	}
	/* the end of the file */
	if (t->fd >= 0) {
		if (!t->error && fchmod(t->fd, t->mode) < 0)
			t->error = errno;
		if (close(t->fd) < 0 && !t->error)
			t->error = errno;
		if (!t->error && rename(t->part, t->path) < 0)
			t->error = errno;
		if (t->error)
			unlink(t->part);
	}
	if (t->error)
		send_error(id, t->error, "%s", strerror(t->error));
	else
		send_frame(T_OK, id, NULL, 0);
	free(t->path);
	free(t->part);
	memset(t, 0, sizeof *t);
}

static void get_file(uint32_t id, const unsigned char *payload, uint32_t length)
{
	if (length < 2 || payload[length - 1] != '\0') {
		send_error(id, EINVAL, "malformed GET_FILE");
		return;
	}
	const char *path = (const char *)payload;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0) {
		int error = errno;
		if (fd >= 0)
			close(fd);
		send_error(id, error, "%s", strerror(error));
		return;
	}
	if (S_ISDIR(st.st_mode)) {
		close(fd);
		send_error(id, EISDIR, "%s", strerror(EISDIR));
		return;
	}
	unsigned char info[12];
	put_le32(info, st.st_mode & 07777);
	put_le64(info + 4, (uint64_t)st.st_size);
	send_frame(T_FILE_INFO, id, info, sizeof info);
	for (;;) {
		ssize_t got = read(fd, out_frame + HEADER_SIZE, CHUNK);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0) {
			int error = errno;
			close(fd);
			send_error(id, error, "read: %s", strerror(error));
			return;
		}
		send_frame(T_DATA, id, out_frame + HEADER_SIZE, (size_t)got);
		if (got == 0)
			break;
	}
	close(fd);
}

static void refresh_request(uint32_t id, const unsigned char *payload, uint32_t length);

/* --- the request loop --------------------------------------------------------------------------- */

static void handle(int type, uint32_t id, unsigned char *payload, uint32_t length)
{
	switch (type) {
	case T_EXEC:
		start_command(id, payload, length);
		break;
	case T_STDIN:
		add_input(id, payload, length);
		break;
	case T_SIGNAL:
		signal_command(id, payload, length);
		break;
	case T_PUT_FILE:
		start_put(id, payload, length);
		break;
	case T_DATA:
		put_data(id, payload, length);
		break;
	case T_GET_FILE:
		get_file(id, payload, length);
		break;
	case T_PING:
		send_frame(T_PONG, id, payload, length);
		break;
	case T_REFRESH:
		refresh_request(id, payload, length);
		break;
	default:
		send_error(id, ENOSYS, "unknown request type %#x", type);
	}
}

static unsigned char *in_buffer;
static size_t in_length, in_capacity;

/* Take the complete frames out of the input buffer; resynchronise on garbage. */
static void parse_input(void)
{
	size_t offset = 0;
	while (in_length - offset >= HEADER_SIZE) {
		unsigned char *h = in_buffer + offset;
		uint32_t length = get_le32(h + 8);
		/* host -> guest types are 0x01-0x7f and the reserved byte is 0: a stricter
		 * check than the magic alone when looking for the next header */
		if (h[0] != (MAGIC & 0xFF) || h[1] != (MAGIC >> 8) || h[2] == 0 || h[2] > 0x7f ||
		    h[3] != 0 || length > MAX_PAYLOAD) {
			offset++;   /* out of step: look for the next header */
			continue;
		}
		if (in_length - offset < HEADER_SIZE + (size_t)length)
			break;
		handle(h[2], get_le32(h + 4), h + HEADER_SIZE, length);
		offset += HEADER_SIZE + length;
	}
	memmove(in_buffer, in_buffer + offset, in_length - offset);
	in_length -= offset;
}

static int read_channel(void)
{
	if (in_capacity - in_length < CHUNK) {
		size_t wanted = in_capacity ? in_capacity * 2 : 4 * CHUNK;
		if (wanted > HEADER_SIZE + MAX_PAYLOAD + 2 * CHUNK)
			wanted = HEADER_SIZE + MAX_PAYLOAD + 2 * CHUNK;
		unsigned char *grown = wanted > in_capacity ? realloc(in_buffer, wanted) : NULL;
		if (grown) {
			in_buffer = grown;
			in_capacity = wanted;
		}
	}
	if (in_length == in_capacity) {
		say("input buffer full without a complete frame: dropped");
		in_length = 0;
	}
	for (;;) {
		ssize_t got = read(channel, in_buffer + in_length, in_capacity - in_length);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0 && errno == EAGAIN)
			return 1;
		if (got <= 0)
			return 0;
		in_length += (size_t)got;
		parse_input();
		return 1;
	}
}

static void serve(void)
{
	sigset_t child;
	sigemptyset(&child);
	sigaddset(&child, SIGCHLD);
	sigprocmask(SIG_BLOCK, &child, NULL);
	int signal_fd = signalfd(-1, &child, SFD_NONBLOCK | SFD_CLOEXEC);
	if (signal_fd < 0) {
		say("signalfd: %s", strerror(errno));
		exit(1);
	}
	for (int i = 0; i < MAX_SESSIONS; i++)
		sessions[i].out = sessions[i].err = sessions[i].in = sessions[i].done = -1;

	start_zygote();
	urandom_fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);   /* -1: opened at each REFRESH */
	unsigned char ready[4 + sizeof AGENT_TEXT - 1];
	put_le32(ready, PROTOCOL_VERSION);
	memcpy(ready + 4, AGENT_TEXT, sizeof AGENT_TEXT - 1);
	send_frame(T_READY, 0, ready, sizeof ready);

	struct pollfd fds[2 + 4 * MAX_SESSIONS];
	struct { struct session *s; int which; } owner[2 + 4 * MAX_SESSIONS];
	for (;;) {
		int n = 0;
		fds[n++] = (struct pollfd){ .fd = channel, .events = POLLIN };
		fds[n++] = (struct pollfd){ .fd = signal_fd, .events = POLLIN };
		for (int i = 0; i < MAX_SESSIONS; i++) {
			struct session *s = &sessions[i];
			if (!s->used)
				continue;
			int wanted[4] = { s->out, s->err, s->input_off < s->input_len ? s->in : -1,
					  s->done };
			for (int which = 0; which < 4; which++) {
				if (wanted[which] < 0)
					continue;
				owner[n].s = s;
				owner[n].which = which;
				fds[n++] = (struct pollfd){ .fd = wanted[which],
							    .events = which == 2 ? POLLOUT : POLLIN };
			}
		}
		if (poll(fds, (nfds_t)n, -1) < 0) {
			if (errno == EINTR)
				continue;
			say("poll: %s", strerror(errno));
			exit(1);
		}
		for (int i = 2; i < n; i++) {
			if (!fds[i].revents)
				continue;
			struct session *s = owner[i].s;
			if (owner[i].which == 0 && s->out == fds[i].fd)
				forward(s->id, &s->out, T_STDOUT, 0);
			else if (owner[i].which == 1 && s->err == fds[i].fd)
				forward(s->id, &s->err, T_STDERR, 0);
			else if (owner[i].which == 2 && s->in == fds[i].fd)
				feed_input(s);
			else if (owner[i].which == 3 && s->done == fds[i].fd)
				read_done(s);
		}
		if (fds[1].revents)
			reap(signal_fd);
		for (int i = 0; i < MAX_SESSIONS; i++)
			if (sessions[i].used && sessions[i].exited)
				finish_session(&sessions[i]);
		if (fds[0].revents & POLLIN) {
			if (!read_channel()) {
				say("the channel closed");
				exit(0);
			}
		} else if (fds[0].revents & (POLLHUP | POLLERR | POLLNVAL)) {
			say("the channel hung up");
			exit(0);
		}
		for (int i = 0; i < MAX_SESSIONS; i++)
			if (sessions[i].used && sessions[i].input_off < sessions[i].input_len)
				feed_input(&sessions[i]);
	}
}

/* --- start-up in the guest ------------------------------------------------------------------------ */

static int read_small_file(const char *path, char *buffer, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t got = read(fd, buffer, size - 1);
	close(fd);
	if (got < 0)
		return -1;
	buffer[got] = '\0';
	buffer[strcspn(buffer, "\n")] = '\0';
	return (int)got;
}

/* /dev/<port> of the port named PORT_NAME, or -1 when there is none (yet). */
static int find_port(char *device, size_t size)
{
	DIR *dir = opendir(PORTS_DIR);
	if (!dir)
		return -1;
	struct dirent *entry;
	int found = -1;
	while (found < 0 && (entry = readdir(dir)) != NULL) {
		if (entry->d_name[0] == '.')
			continue;
		char path[300], name[128];
		snprintf(path, sizeof path, "%s/%s/name", PORTS_DIR, entry->d_name);
		if (read_small_file(path, name, sizeof name) > 0 && strcmp(name, PORT_NAME) == 0) {
			snprintf(device, size, "/dev/%s", entry->d_name);
			found = 0;
		}
	}
	closedir(dir);
	return found;
}

static void mount_shares(void)
{
	DIR *dir = opendir(BLOCK_DIR);
	if (!dir)
		return;
	struct dirent *entry;
	while ((entry = readdir(dir)) != NULL) {
		if (strncmp(entry->d_name, "vd", 2) != 0)
			continue;
		char path[300], serial[64], target[128], device[300];
		snprintf(path, sizeof path, "%s/%s/serial", BLOCK_DIR, entry->d_name);
		if (read_small_file(path, serial, sizeof serial) <= 0 ||
		    strncmp(serial, SHARE_PREFIX, strlen(SHARE_PREFIX)) != 0)
			continue;
		snprintf(target, sizeof target, "/mnt/%s", serial + strlen("pykvm-"));
		snprintf(device, sizeof device, "/dev/%s", entry->d_name);
		mkdir(target, 0755);
		unsigned long flags = MS_RDONLY | MS_NOSUID | MS_NODEV;
		if (mount(device, target, "ext4", flags, NULL) < 0 &&
		    mount(device, target, "ext2", flags, NULL) < 0)
			say("cannot mount %s (%s) on %s: %s", device, serial, target, strerror(errno));
	}
	closedir(dir);
}

#define REFRESH_BYTES 512
#define REFRESH_FAILED 125

/* Mix `have` bytes of `bytes` into the kernel's input pool and credit them, force the
 * CRNG to reseed, set CLOCK_REALTIME to `now`: all of it is tried. 0, or the errno of
 * the first step that failed with what it was in `why`. `urandom` is /dev/urandom open
 * for writing, or -1 to open it here. */
static int freshen(const unsigned char *bytes, size_t have, struct timespec now, int urandom,
		   char *why, size_t size)
{
	struct {
		struct rand_pool_info info;
		unsigned char bytes[REFRESH_BYTES];
	} seed;
	int error = 0;

	if (have > REFRESH_BYTES || now.tv_sec < 0 || now.tv_nsec < 0 || now.tv_nsec > 999999999) {
		snprintf(why, size, "%zu bytes of seed (at most %d), time %lld.%ld", have,
			 REFRESH_BYTES, (long long)now.tv_sec, (long)now.tv_nsec);
		return EINVAL;
	}
	memcpy(seed.bytes, bytes, have);
	int random_fd = urandom >= 0 ? urandom : open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (random_fd < 0) {
		error = errno;
		snprintf(why, size, "/dev/urandom: %s", strerror(error));
	} else {
		seed.info.entropy_count = (int)(have * 8);
		seed.info.buf_size = (int)have;
		if (have && ioctl(random_fd, RNDADDENTROPY, &seed.info) < 0) {
			error = errno;
			snprintf(why, size, "RNDADDENTROPY: %s", strerror(error));
		}
		if (ioctl(random_fd, RNDRESEEDCRNG) < 0 && !error) {
			error = errno;
			snprintf(why, size, "RNDRESEEDCRNG: %s", strerror(error));
		}
		if (random_fd != urandom)
			close(random_fd);
	}
	if (clock_settime(CLOCK_REALTIME, &now) < 0 && !error) {
		error = errno;
		snprintf(why, size, "clock_settime: %s", strerror(error));
	}
	return error;
}

/* A REFRESH frame: u64 seconds, u32 nanoseconds, then the seed. */
static void refresh_request(uint32_t id, const unsigned char *payload, uint32_t length)
{
	char why[300];

	if (length < 12) {
		send_error(id, EINVAL, "malformed REFRESH");
		return;
	}
	uint64_t seconds = get_le32(payload) | (uint64_t)get_le32(payload + 4) << 32;
	struct timespec now = { (time_t)(seconds > INT64_MAX ? -1 : (int64_t)seconds),
				(long)get_le32(payload + 8) };
	int error = freshen(payload + 12, length - 12, now, urandom_fd, why, sizeof why);
	if (error)
		send_error(id, error, "refresh: %s", why);
	else
		send_frame(T_OK, id, NULL, 0);
}

/* --refresh: see the comment at the top. Exits 0, or REFRESH_FAILED with what failed
 * on stderr; with a command line, becomes the command. */
static int refresh(const char *seconds, const char *nanoseconds, const char *command)
{
	unsigned char seed[REFRESH_BYTES];
	char why[300];
	size_t have = 0;
	ssize_t got;
	while (have < REFRESH_BYTES &&
	       (got = read(STDIN_FILENO, seed + have, REFRESH_BYTES - have)) != 0) {
		if (got < 0) {
			if (errno == EINTR)
				continue;
			say("refresh: reading the seed: %s", strerror(errno));
			return REFRESH_FAILED;
		}
		have += (size_t)got;
	}
	char *end_s, *end_ns;
	errno = 0;
	long long when = strtoll(seconds, &end_s, 10);
	long nano = strtol(nanoseconds, &end_ns, 10);
	if (errno || *end_s || *end_ns || when < 0 || nano < 0 || nano > 999999999) {
		say("refresh: bad time %s.%s", seconds, nanoseconds);
		return REFRESH_FAILED;
	}
	struct timespec now = { (time_t)when, nano };
	if (freshen(seed, have, now, -1, why, sizeof why) != 0) {
		say("refresh: %s", why);
		return REFRESH_FAILED;
	}
	if (command == NULL)
		return 0;
	int null = open("/dev/null", O_RDONLY);
	if (null < 0 || dup2(null, STDIN_FILENO) < 0) {
		say("refresh: /dev/null: %s", strerror(errno));
		return REFRESH_FAILED;
	}
	if (null != STDIN_FILENO)
		close(null);
	execl("/bin/sh", "sh", "-c", command, (char *)NULL);
	int error = errno;
	dprintf(STDERR_FILENO, "pykvm-agent: /bin/sh: %s\n", strerror(error));
	return error == ENOENT ? 127 : 126;
}

/* --- virtio-vsock ------------------------------------------------------------------------- */

/* A vsock port: a decimal u32 other than VMADDR_PORT_ANY; -2 (a usage error) if not. */
static long vsock_port(const char *text)
{
	char *end;
	errno = 0;
	unsigned long long value = strtoull(text, &end, 10);
	if (errno || end == text || *end || text[0] == '-' || value >= VMADDR_PORT_ANY)
		return -2;
	return (long)value;
}

static int vsock_socket(unsigned int port, struct sockaddr_vm *address, unsigned int cid)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		say("vsock socket: %s", strerror(errno));
		exit(1);
	}
	memset(address, 0, sizeof *address);
	address->svm_family = AF_VSOCK;
	address->svm_cid = cid;
	address->svm_port = port;
	return fd;
}

/* --vsock-connect PORT: the channel is a connection to the host's port PORT. */
static void vsock_connect(unsigned int port)
{
	struct sockaddr_vm host;
	int fd = vsock_socket(port, &host, VMADDR_CID_HOST);
	if (connect(fd, (struct sockaddr *)&host, sizeof host) < 0) {
		say("vsock connect to host port %u: %s", port, strerror(errno));
		exit(1);
	}
	channel = fd;
	set_nonblocking(channel);
}

/* --vsock-listen PORT: each connection gets its own agent (a child), or, with once,
 * the first one gets this process. Returns in the process that serves one. */
static void vsock_listen(unsigned int port, int once)
{
	struct sockaddr_vm any;
	int listener = vsock_socket(port, &any, VMADDR_CID_ANY);
	if (bind(listener, (struct sockaddr *)&any, sizeof any) < 0 || listen(listener, 4) < 0) {
		say("vsock listen on port %u: %s", port, strerror(errno));
		exit(1);
	}
	if (!once)
		signal(SIGCHLD, SIG_IGN);        /* the connection agents reap themselves */
	for (;;) {
		int connection = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
		if (connection < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			say("vsock accept: %s", strerror(errno));
			exit(1);
		}
		if (!once) {
			pid_t child = fork();
			if (child < 0) {
				say("fork: %s", strerror(errno));
				close(connection);
				continue;
			}
			if (child > 0) {
				close(connection);
				continue;
			}
			signal(SIGCHLD, SIG_DFL);    /* serve() reaps its commands itself */
		}
		close(listener);
		channel = connection;
		set_nonblocking(channel);
		return;
	}
}

int main(int argc, char **argv)
{
	const char *device_path = NULL;
	int mount_wanted = 1;
	long listen_port = -1, connect_port = -1;
	int once = 0;

	if ((argc == 4 || argc == 5) && strcmp(argv[1], "--refresh") == 0)
		return refresh(argv[2], argv[3], argc == 5 ? argv[4] : NULL);
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--device") == 0 && i + 1 < argc) {
			device_path = argv[++i];
		} else if (strcmp(argv[i], "--fd") == 0 && i + 1 < argc) {
			channel = atoi(argv[++i]);
		} else if (strcmp(argv[i], "--no-mount") == 0) {
			mount_wanted = 0;
		} else if (strcmp(argv[i], "--vsock-listen") == 0 && i + 1 < argc) {
			listen_port = vsock_port(argv[++i]);
		} else if (strcmp(argv[i], "--vsock-connect") == 0 && i + 1 < argc) {
			connect_port = vsock_port(argv[++i]);
		} else if (strcmp(argv[i], "--once") == 0) {
			once = 1;
		} else {
			listen_port = connect_port = -2;
			break;
		}
	}
	if (listen_port == -2 || (listen_port >= 0 && connect_port >= 0)) {
		fprintf(stderr, "usage: pykvm-agent [--device PATH | --fd N] [--no-mount]\n"
			"       pykvm-agent --vsock-listen PORT [--once] | --vsock-connect PORT\n"
			"       pykvm-agent --refresh SECONDS NANOSECONDS [COMMAND_LINE] < seed\n");
		return 2;
	}
	if (listen_port >= 0 || connect_port >= 0)
		mount_wanted = 0;             /* the virtio-serial agent mounts the shares */
	for (int fd = 0; fd <= 2; fd++)   /* pipes must not become fds 0-2 */
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
			return 1;
	signal(SIGPIPE, SIG_IGN);
	if (mount_wanted)
		mount_shares();
	if (listen_port >= 0) {
		vsock_listen((unsigned int)listen_port, once);
	} else if (connect_port >= 0) {
		vsock_connect((unsigned int)connect_port);
	} else if (channel < 0) {
		char found[300];
		if (!device_path) {
			struct timespec pause = { 0, 50 * 1000 * 1000 };
			for (int tries = 0; find_port(found, sizeof found) < 0; tries++) {
				if (tries >= PORT_WAIT_SECONDS * 20) {
					say("no virtio port named %s (is this a pykvm machine with --agent?)",
					    PORT_NAME);
					return 1;
				}
				nanosleep(&pause, NULL);
			}
			device_path = found;
		}
		channel = open(device_path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
		if (channel < 0) {
			say("cannot open %s: %s", device_path, strerror(errno));
			return 1;
		}
	} else {
		fcntl(channel, F_SETFD, FD_CLOEXEC);
		set_nonblocking(channel);
	}
	serve();
	return 0;
}
