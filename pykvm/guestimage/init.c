/*
 * /init of pykvm's default Linux guest: PID 1 as one small static program.
 *
 * Why C and not a shell script: on kvm_pvm hosts every fork+exec costs about
 * 1.5 s and every system call about 6.5 ms (docs/hosts.md), so init does its
 * work in-process, forks once, and keeps its system calls few.
 *
 * Protocol with pykvm (the ports are pykvm/layout.py's):
 *   port 0xF5 <- 1 init started, 2 command started, 3 shell started
 *   port 0xF4 <- the final exit status byte; pykvm stops the VM on it
 * Command mode: /pykvm/cmd exists (pykvm appends a second cpio archive that
 *   carries it): run its exact text with `/bin/sh -c`, report the status.
 * Shell mode otherwise: an interactive /bin/sh on the console's tty, report
 *   its status when it exits (no respawn).
 * busybox poweroff / reboot / halt signal PID 1: report 0.
 * With pykvm.agent=1 on the kernel command line, /sbin/pykvm-agent (agent.c)
 *   is started too, before the command or shell; init only reaps it.
 *   With pykvm.agent=vsock:PORT instead, the agent serves its protocol over
 *   virtio-vsock, listening on guest port PORT (--vsock-listen PORT): guests
 *   booted through Firecracker's API, whose host reaches them by CONNECT PORT
 *   on the device's uds_path (docs/vsock.md), not over a virtio-serial port.
 * With pykvm.virtiofs=NAME:TAG[:ro],... (pykvm run --share DIR: live shares,
 *   pykvm/share.py), each virtio-fs TAG is mounted at /mnt/NAME first.
 * With pykvm.rootfs=TAG pykvm.cwd=TAG2:PATH (pykvm run --rootfs DIR), virtio-fs
 *   TAG is the root, read-only, under a tmpfs overlay that takes the writes;
 *   TAG2 is mounted read-write at PATH, and the command or shell runs there
 *   in that root (chroot), without the agent (the tree has none).
 * With pykvm.dhcp=MAC[,MAC]... (pykvm run --net user: NICs whose host end is
 *   passt), each NIC with one of those MACs is brought up and configured by
 *   busybox udhcpc (address, default route, /etc/resolv.conf: the initramfs's
 *   /etc/udhcpc/default.script), before the command or shell starts.
 *   Other NICs (TAPs) are left down for the command's static configuration.
 * With root=/dev/DEVICE (pykvm run --image FILE: pykvm/distro/boot.py), that
 *   block device (ext4, or rootfstype=) is mounted read-write (read-only with
 *   the word ro), the same /proc, /sys, /dev, /tmp, /run are mounted in it,
 *   and the command, shell and agent run chrooted there. The agent is this
 *   initramfs's, bound in at /run/pykvm-agent: the image needs nothing of
 *   pykvm's. /pykvm/cmd is read before the switch, from the initramfs.
 *   The root is remounted read-only before the status is reported.
 * Init's own failures are printed and reported as 125 (or 126/127 when the
 * shell cannot be executed), never as a kernel panic.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <dirent.h>
#include <net/if.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

enum {
	EXIT_PORT = 0xF4,
	PROGRESS_PORT = 0xF5, /* right after EXIT_PORT: one ioperm covers both */
	PROGRESS_INIT_STARTED = 1,
	PROGRESS_COMMAND_STARTED = 2,
	PROGRESS_SHELL_STARTED = 3,
};

/* Init's own failures, with the meanings env(1) and container runtimes use. */
enum { STATUS_INIT_FAILED = 125, STATUS_CANNOT_EXEC = 126, STATUS_NOT_FOUND = 127 };

#define COMMAND_FILE "/pykvm/cmd"
#define SHELL "/bin/sh"
#define CONSOLE_ACTIVE "/sys/class/tty/console/active"
#define AGENT "/sbin/pykvm-agent"
#define AGENT_FLAG "pykvm.agent=1"
#define AGENT_VSOCK_KEY "pykvm.agent=vsock:"
#define KERNEL_CMDLINE "/proc/cmdline"
#define DHCP_KEY "pykvm.dhcp="
#define UDHCPC "/sbin/udhcpc"
#define SYS_NET "/sys/class/net"
#define VIRTIOFS_KEY "pykvm.virtiofs="
#define ROOTFS_KEY "pykvm.rootfs="
#define CWD_KEY "pykvm.cwd="
#define ROOT_LOWER "/pykvm/lower"
#define ROOT_RW "/pykvm/rw"
#define ROOT_MERGED "/pykvm/root"
#define BLOCK_ROOT_KEY "root="
#define BLOCK_ROOT_TYPE_KEY "rootfstype="
#define IMAGE_AGENT "/run/pykvm-agent"
#define ROOT_DEVICE_TRIES 50 /* x 100 ms: a disk may still be probing */
#define CONSOLE_NAMES_MAX 128
#define CONSOLE_PATH_MAX (CONSOLE_NAMES_MAX + sizeof "/dev/")
#define SYSLOG_ACTION_CONSOLE_LEVEL 8
#define CONSOLE_LEVEL_EMERGENCIES_ONLY 1

#ifdef PYKVM_INIT_HOST_TEST
/*
 * test_init.py builds init with this defined and runs it as PID 1 of a PID
 * namespace on the host, where touching real ports or the host's console log
 * level would be wrong: port writes become lines in a file, and the console
 * is the one the test names.
 */
#define HOST_TEST_PORTS "/pykvm-test/ports"
#undef CONSOLE_ACTIVE
#define CONSOLE_ACTIVE "/pykvm-test/console-active"
#define ioperm(from, count, on) 0
#define klogctl(type, buffer, length) ((void)0)
#define outb(value, port) host_test_outb(value, port)
static void host_test_outb(unsigned char value, unsigned short port)
{
	FILE *log = fopen(HOST_TEST_PORTS, "a");
	if (log) {
		fprintf(log, "%#x %d\n", port, value);
		fclose(log);
	}
}
#endif

static int have_ports; /* ioperm succeeded, so outb will not fault */
static int block_root; /* root=/dev/DEVICE is mounted and "/" (enter_block_root) */

/* One line on the console, in a single write(). */
static void say(const char *format, ...)
{
	char line[512];
	const size_t room = sizeof line - 1; /* keep one byte for the newline */
	va_list args;
	size_t length = (size_t)snprintf(line, room, "pykvm-init: ");

	va_start(args, format);
	int added = vsnprintf(line + length, room - length, format, args);
	va_end(args);
	if (added > 0)
		length += (size_t)added;
	if (length > room - 1)
		length = room - 1; /* truncated: vsnprintf stopped at room */
	line[length++] = '\n';
	if (write(STDERR_FILENO, line, length) < 0) {
		/* nowhere else to report it */
	}
}

static void port_write(unsigned short port, unsigned char value)
{
	if (have_ports)
		outb(value, port);
}

/* Hand pykvm the status. PID 1 must never return: the kernel would panic. */
static void __attribute__((noreturn)) finish(int status)
{
	sync();
	/* A block root is left clean (its journal empty), so the next run can
	 * mount it read-only; busy (a process still writes): synced only. */
	if (block_root)
		mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL);
	port_write(EXIT_PORT, (unsigned char)status);
	/* Still running: not under pykvm. Stop the ordinary way. */
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

struct mount_point {
	const char *source, *target, *type;
	unsigned long flags;
	const char *options;
	int optional; /* absent from some kernels: no message if missing */
};

static const struct mount_point mounts[] = {
	{ "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0 },
	{ "sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL, 0 },
	{ "devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", 0 },
	{ "devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666", 1 },
	{ "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", 0 },
	{ "tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", 0 },
};

/* True if path is its own mount (a different device from "/"). */
static int is_mount_point(const char *path)
{
	struct stat root, here;

	return stat("/", &root) == 0 && stat(path, &here) == 0 && root.st_dev != here.st_dev;
}

static void mount_file_systems(void)
{
	for (size_t i = 0; i < sizeof mounts / sizeof mounts[0]; i++) {
		const struct mount_point *m = &mounts[i];

		/* CONFIG_DEVTMPFS_MOUNT does not apply to an initramfs, but a
		 * custom kernel or initramfs may have mounted it already. */
		if (strcmp(m->type, "devtmpfs") == 0 && is_mount_point(m->target))
			continue;
		int done = mount(m->source, m->target, m->type, m->flags, m->options);
		if (done < 0 && errno == ENOENT) { /* mkdir only when needed: syscalls are dear */
			mkdir(m->target, 0755);
			done = mount(m->source, m->target, m->type, m->flags, m->options);
		}
		if (done < 0 && !(m->optional && errno == ENODEV))
			say("cannot mount %s on %s: %s", m->type, m->target, strerror(errno));
	}
}

/* The whole of /pykvm/cmd, or NULL in shell mode (no such file). */
static char *read_command(void)
{
	int fd = open(COMMAND_FILE, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		if (errno == ENOENT)
			return NULL;
		say("cannot open %s: %s", COMMAND_FILE, strerror(errno));
		finish(STATUS_INIT_FAILED);
	}
	struct stat st;
	size_t capacity = fstat(fd, &st) == 0 ? (size_t)st.st_size + 1 : 4096, length = 0;
	char *text = malloc(capacity);
	for (;;) {
		if (text && length + 1 >= capacity)
			text = realloc(text, capacity *= 2);
		if (!text) {
			say("out of memory reading %s", COMMAND_FILE);
			finish(STATUS_INIT_FAILED);
		}
		ssize_t got = read(fd, text + length, capacity - length - 1);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0) {
			say("cannot read %s: %s", COMMAND_FILE, strerror(errno));
			finish(STATUS_INIT_FAILED);
		}
		if (got == 0)
			break;
		length += (size_t)got;
	}
	close(fd);
	text[length] = '\0';
	if (strlen(text) != length)
		say("%s contains NUL bytes: the shell sees only the text before the first",
		    COMMAND_FILE);
	return text;
}

/*
 * The tty behind /dev/console ("/dev/ttyS0", "/dev/hvc0" with console=hvc0):
 * the last name in /sys/class/tty/console/active, as busybox cttyhack finds
 * it. /dev/console itself never becomes a controlling tty when opened, so a
 * shell on it would have no job control and no Ctrl-C.
 */
static void console_tty(char *path, size_t size)
{
	char names[CONSOLE_NAMES_MAX];
	ssize_t got = 0;
	int fd = open(CONSOLE_ACTIVE, O_RDONLY | O_CLOEXEC);

	snprintf(path, size, "/dev/console");
	if (fd >= 0) {
		got = read(fd, names, sizeof names - 1);
		close(fd);
	}
	if (got <= 0)
		return;
	names[got] = '\0';
	names[strcspn(names, "\n")] = '\0';
	char *last = strrchr(names, ' ');
	last = last ? last + 1 : names;
	if (*last)
		snprintf(path, size, "/dev/%s", last);
}

/* In the child: a new session whose controlling tty is the console. */
static void attach_console(int command_mode)
{
	char path[CONSOLE_PATH_MAX];

	console_tty(path, sizeof path);
	if (setsid() < 0)
		say("setsid: %s", strerror(errno));
	int fd = open(path, O_RDWR);
	if (fd < 0) {
		say("cannot open %s: %s (staying on /dev/console, no job control)", path,
		    strerror(errno));
		return;
	}
	if (ioctl(fd, TIOCSCTTY, 0) < 0)
		say("cannot make %s the controlling tty: %s", path, strerror(errno));
	if (command_mode) {
		/* A command's output must arrive as written ("\n", not "\r\n"),
		 * and input pykvm forwards must not be echoed into it. */
		struct termios mode;
		if (tcgetattr(fd, &mode) == 0) {
			mode.c_oflag &= ~(tcflag_t)OPOST;
			mode.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
			tcsetattr(fd, TCSANOW, &mode);
		}
	}
	for (int target = 0; target <= 2; target++)
		dup2(fd, target);
	if (fd > 2)
		close(fd);
}

/* The kernel command line, read once (syscalls are dear); "" if unreadable. */
static char kernel_cmdline[4096];

static void read_kernel_cmdline(void)
{
	int fd = open(KERNEL_CMDLINE, O_RDONLY | O_CLOEXEC);
	ssize_t got = fd < 0 ? -1 : read(fd, kernel_cmdline, sizeof kernel_cmdline - 1);

	if (fd >= 0)
		close(fd);
	kernel_cmdline[got > 0 ? got : 0] = '\0';
}

/* The word of the command line that starts with prefix, or NULL. */
static const char *cmdline_word(const char *prefix)
{
	const char *at = kernel_cmdline;

	while ((at = strstr(at, prefix)) != NULL) {
		if (at == kernel_cmdline || at[-1] == ' ')
			return at;
		at += strlen(prefix);
	}
	return NULL;
}

/* Live shares: pykvm.virtiofs=NAME:TAG[:ro],... -> mount virtio-fs TAG at /mnt/NAME. */
static void mount_virtiofs(void)
{
	const char *at = cmdline_word(VIRTIOFS_KEY);
	char list[1024];

	if (!at)
		return;
	at += strlen(VIRTIOFS_KEY);
	size_t length = strcspn(at, " \n");
	if (length >= sizeof list) {
		say("%s: too long", VIRTIOFS_KEY);
		return;
	}
	memcpy(list, at, length);
	list[length] = '\0';
	mkdir("/mnt", 0755);
	char *save = NULL;
	for (char *name = strtok_r(list, ",", &save); name; name = strtok_r(NULL, ",", &save)) {
		char *tag = strchr(name, ':');
		if (!tag)
			continue;
		*tag++ = '\0';
		unsigned long flags = MS_NOSUID | MS_NODEV;
		char *mode = strchr(tag, ':');
		if (mode) {
			*mode++ = '\0';
			if (strcmp(mode, "ro") == 0)
				flags |= MS_RDONLY;
		}
		char target[160];
		snprintf(target, sizeof target, "/mnt/%s", name);
		mkdir(target, 0755);
		if (mount(tag, target, "virtiofs", flags, NULL) < 0)
			say("cannot mount virtio-fs %s on %s: %s", tag, target, strerror(errno));
	}
}

/* The value of word KEY=VALUE on the command line copied into out, or 0. */
static int cmdline_value(const char *key, char *out, size_t size)
{
	const char *at = cmdline_word(key);

	if (!at)
		return 0;
	at += strlen(key);
	size_t length = strcspn(at, " \n");
	if (length == 0 || length >= size) {
		say("%s: empty or too long", key);
		return 0;
	}
	memcpy(out, at, length);
	out[length] = '\0';
	return 1;
}

static int mount_or_say(const char *source, const char *target, const char *type,
			unsigned long flags, const char *options)
{
	mkdir(target, 0755);
	if (mount(source, target, type, flags, options) == 0)
		return 1;
	say("cannot mount %s (%s) on %s: %s", source, type, target, strerror(errno));
	return 0;
}

/* mkdir -p for a path inside the (writable) overlay root. */
static void make_path(char *path)
{
	for (char *slash = strchr(path + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
		*slash = '\0';
		mkdir(path, 0755);
		*slash = '/';
	}
	mkdir(path, 0755);
}

/* /proc, /sys, /dev, /dev/pts, /tmp and /run in the root being entered. */
static void mount_new_root_file_systems(void)
{
	mount_or_say("proc", ROOT_MERGED "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_or_say("sysfs", ROOT_MERGED "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_or_say("devtmpfs", ROOT_MERGED "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount_or_say("devpts", ROOT_MERGED "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		     "mode=0620,ptmxmode=0666");
	mount_or_say("tmpfs", ROOT_MERGED "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_or_say("tmpfs", ROOT_MERGED "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
}

/* True if word is on the command line as a whole word ("ro" is not "root=..."). */
static int cmdline_flag(const char *word)
{
	size_t length = strlen(word);

	for (const char *at = kernel_cmdline; (at = strstr(at, word)) != NULL; at += length)
		if ((at == kernel_cmdline || at[-1] == ' ') && strchr(" \n", at[length]))
			return 1;
	return 0;
}

/* The agent's path: the initramfs's, or its bind mount inside a block root. */
static const char *agent_path = AGENT;

/* pykvm.agent=vsock:PORT's PORT (decimal, 1..0xFFFFFFFE), or NULL; a bad one is said. */
static const char *agent_vsock_port(void)
{
	static char port[16];
	char *end;

	if (!cmdline_value(AGENT_VSOCK_KEY, port, sizeof port))
		return NULL;
	errno = 0;
	unsigned long value = strtoul(port, &end, 10);
	if (errno || *end || port[0] < '0' || port[0] > '9' || value == 0 || value >= 0xFFFFFFFFUL) {
		say("%s%s: not a vsock port", AGENT_VSOCK_KEY, port);
		return NULL;
	}
	return port;
}

/* Whether the command line asks for the agent, on virtio-serial or on vsock. */
static int agent_wanted(void)
{
	return cmdline_flag(AGENT_FLAG) || agent_vsock_port() != NULL;
}

/* root=/dev/DEVICE: see the comment at the top. Returns 1 when the root was switched. */
static int enter_block_root(void)
{
	char device[64], type[32] = "ext4";

	if (!cmdline_value(BLOCK_ROOT_KEY, device, sizeof device))
		return 0;
	if (strncmp(device, "/dev/", 5) != 0 || strstr(device, "..")) {
		say("root=%s: give a /dev/ name", device);
		finish(STATUS_INIT_FAILED);
	}
	cmdline_value(BLOCK_ROOT_TYPE_KEY, type, sizeof type);
	unsigned long flags = cmdline_flag("ro") ? MS_RDONLY : 0;
	mkdir("/pykvm", 0755);
	mkdir(ROOT_MERGED, 0755);
	int tries = 0;
	const char *options = NULL;
	while (mount(device, ROOT_MERGED, type, flags, options) < 0) {
		if (errno == EROFS && (flags & MS_RDONLY) && !options) {
			/* read-only, with a journal a killed run left: use it unreplayed */
			say("%s needs journal recovery: mounted without it, read-only", device);
			options = "noload";
			continue;
		}
		if ((errno != ENOENT && errno != ENXIO) || ++tries >= ROOT_DEVICE_TRIES) {
			say("cannot mount %s (%s) as the root: %s", device, type, strerror(errno));
			finish(STATUS_INIT_FAILED);
		}
		usleep(100 * 1000);
	}
	block_root = 1;
	mount_new_root_file_systems();
	if (agent_wanted()) {
		int fd = open(ROOT_MERGED IMAGE_AGENT, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW |
			      O_CLOEXEC, 0755);
		if (fd >= 0)
			close(fd);
		if (mount(AGENT, ROOT_MERGED IMAGE_AGENT, NULL, MS_BIND, NULL) == 0)
			agent_path = IMAGE_AGENT;
		else
			say("cannot bind %s into the root: %s", AGENT, strerror(errno));
	}
	if (chroot(ROOT_MERGED) < 0 || chdir("/") < 0) {
		say("cannot enter the root %s: %s", device, strerror(errno));
		finish(STATUS_INIT_FAILED);
	}
	return 1;
}

/* --rootfs: see the comment at the top. Returns 1 when the root was switched. */
static int enter_rootfs(void)
{
	char tag[64], cwd[1024], path[1200];

	if (!cmdline_value(ROOTFS_KEY, tag, sizeof tag))
		return 0;
	mkdir("/pykvm", 0755);
	if (!mount_or_say(tag, ROOT_LOWER, "virtiofs", MS_RDONLY, NULL) ||
	    !mount_or_say("tmpfs", ROOT_RW, "tmpfs", 0, "mode=0755"))
		finish(STATUS_INIT_FAILED);
	mkdir(ROOT_RW "/upper", 0755);
	mkdir(ROOT_RW "/work", 0755);
	if (!mount_or_say("overlay", ROOT_MERGED, "overlay", 0,
			  "lowerdir=" ROOT_LOWER ",upperdir=" ROOT_RW "/upper,workdir=" ROOT_RW "/work"))
		finish(STATUS_INIT_FAILED);
	mount_new_root_file_systems();
	const char *directory = "/";
	char *colon;
	if (cmdline_value(CWD_KEY, cwd, sizeof cwd) && (colon = strchr(cwd, ':')) && colon[1] == '/') {
		*colon = '\0';
		snprintf(path, sizeof path, "%s%s", ROOT_MERGED, colon + 1);
		make_path(path);
		if (mount_or_say(cwd, path, "virtiofs", MS_NOSUID | MS_NODEV, NULL))
			directory = colon + 1;
	}
	if (chroot(ROOT_MERGED) < 0 || chdir("/") < 0) {
		say("cannot enter the shared root: %s", strerror(errno));
		finish(STATUS_INIT_FAILED);
	}
	if (chdir(directory) < 0)
		say("cannot enter %s: %s", directory, strerror(errno));
	return 1;
}

/* Bring NIC name up with one ioctl (no fork+exec of `ip link`). */
static void link_up(const char *name)
{
	struct ifreq request;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	memset(&request, 0, sizeof request);
	memcpy(request.ifr_name, name, strnlen(name, IFNAMSIZ - 1)); /* checked < IFNAMSIZ */
	if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &request) < 0 ||
	    (request.ifr_flags |= IFF_UP, ioctl(fd, SIOCSIFFLAGS, &request) < 0))
		say("cannot bring %s up: %s", name, strerror(errno));
	if (fd >= 0)
		close(fd);
}

/* Run udhcpc on NIC name and wait for it: it quits once configured (-q) or
 * after its tries (-n), so a NIC without a DHCP server costs seconds, not the boot. */
static void run_udhcpc(const char *name, const sigset_t *child_mask)
{
	pid_t pid = fork();

	if (pid < 0) {
		say("cannot fork %s: %s", UDHCPC, strerror(errno));
		return;
	}
	if (pid == 0) {
		sigprocmask(SIG_SETMASK, child_mask, NULL);
		execl(UDHCPC, "udhcpc", "-f", "-q", "-n", "-t", "10", "-T", "3", "-i", name,
		      (char *)NULL);
		say("cannot run %s: %s", UDHCPC, strerror(errno));
		_exit(STATUS_NOT_FOUND);
	}
	int status;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		say("udhcpc got no lease on %s", name);
}

/* pykvm.dhcp=MAC,...: see the comment at the top. */
static void configure_dhcp(const sigset_t *child_mask)
{
	const char *at = cmdline_word(DHCP_KEY);
	char macs[512], path[300], address[32];

	if (!at)
		return;
	at += strlen(DHCP_KEY);
	size_t length = strcspn(at, " \n");
	if (length >= sizeof macs)
		length = 0;
	memcpy(macs, at, length);
	macs[length] = '\0';
	DIR *directory = opendir(SYS_NET);
	if (!directory)
		return;
	struct dirent *entry;
	while ((entry = readdir(directory)) != NULL) {
		if (entry->d_name[0] == '.' || strlen(entry->d_name) >= IFNAMSIZ)
			continue;
		snprintf(path, sizeof path, SYS_NET "/%s/address", entry->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		ssize_t got = fd < 0 ? -1 : read(fd, address, sizeof address - 1);
		if (fd >= 0)
			close(fd);
		if (got < 17)
			continue;
		address[17] = '\0';   /* xx:xx:xx:xx:xx:xx */
		for (char *mac = macs; *mac; mac += strcspn(mac, ",") + (mac[strcspn(mac, ",")] != 0)) {
			if (strcspn(mac, ",") == 17 && strncasecmp(mac, address, 17) == 0) {
				link_up(entry->d_name);
				run_udhcpc(entry->d_name, child_mask);
				break;
			}
		}
	}
	closedir(directory);
}

/* pykvm-agent (agent.c), when pykvm asked for it on the kernel command line. */
static void start_agent(const sigset_t *child_mask)
{
	const char *vsock_port = agent_vsock_port();
	if (!vsock_port && !cmdline_flag(AGENT_FLAG))
		return;
	pid_t pid = fork();
	if (pid < 0) {
		say("cannot fork %s: %s", agent_path, strerror(errno));
		return;
	}
	if (pid == 0) {
		sigprocmask(SIG_SETMASK, child_mask, NULL);
		if (vsock_port)
			execl(agent_path, "pykvm-agent", "--vsock-listen", vsock_port, (char *)NULL);
		else
			execl(agent_path, "pykvm-agent", (char *)NULL);
		say("cannot run %s: %s", agent_path, strerror(errno));
		_exit(STATUS_NOT_FOUND);
	}
}

/* Fork /bin/sh (with -c command, or interactive when command is NULL). */
static pid_t start_shell(const char *command, const sigset_t *child_mask)
{
	pid_t pid = fork();

	if (pid < 0) {
		say("cannot fork: %s", strerror(errno));
		finish(STATUS_INIT_FAILED);
	}
	if (pid > 0)
		return pid;
	/* A blocked mask survives exec: give the shell back the usual signals. */
	sigprocmask(SIG_SETMASK, child_mask, NULL);
	attach_console(command != NULL);
	if (command)
		execl(SHELL, "sh", "-c", command, (char *)NULL);
	else
		execl(SHELL, "sh", (char *)NULL);
	int error = errno;
	say("cannot run %s: %s", SHELL, strerror(error));
	_exit(error == ENOENT ? STATUS_NOT_FOUND : STATUS_CANNOT_EXEC);
}

static int exit_status(int wait_status)
{
	if (WIFSIGNALED(wait_status))
		return 128 + WTERMSIG(wait_status);
	return WEXITSTATUS(wait_status);
}

int main(void)
{
	if (getpid() != 1) {
		/* Outside a guest, writing to ports 0xF4/0xF5 would be wrong. */
		fprintf(stderr, "pykvm-init: must run as PID 1 in a pykvm guest\n");
		return 2;
	}
	have_ports = ioperm(EXIT_PORT, 2, 1) == 0;
	port_write(PROGRESS_PORT, PROGRESS_INIT_STARTED); /* pykvm's boot timer */
	if (!have_ports)
		say("ioperm: %s; cannot report to pykvm", strerror(errno));

	/*
	 * Children's deaths and the power signals of busybox poweroff (SIGUSR2),
	 * reboot (SIGTERM) and halt (SIGUSR1) are taken with sigwaitinfo. They
	 * stay blocked: the kernel drops signals that PID 1 leaves at SIG_DFL,
	 * but queues blocked ones.
	 */
	sigset_t handled, original;
	sigemptyset(&handled);
	sigaddset(&handled, SIGCHLD);
	sigaddset(&handled, SIGUSR1);
	sigaddset(&handled, SIGUSR2);
	sigaddset(&handled, SIGTERM);
	sigprocmask(SIG_BLOCK, &handled, &original);

	mount_file_systems();
	read_kernel_cmdline();
	mount_virtiofs();
	setenv("PATH", "/bin:/sbin:/usr/bin:/usr/sbin", 1);
	setenv("HOME", "/root", 1);
	configure_dhcp(&original);

	char *command = read_command();
	if (!enter_rootfs()) {
		enter_block_root();
		start_agent(&original);
	}
	pid_t main_child;
	if (command) {
		/* Kernel messages would interleave with the command's output. */
		klogctl(SYSLOG_ACTION_CONSOLE_LEVEL, NULL, CONSOLE_LEVEL_EMERGENCIES_ONLY);
		port_write(PROGRESS_PORT, PROGRESS_COMMAND_STARTED);
		main_child = start_shell(command, &original);
	} else {
		port_write(PROGRESS_PORT, PROGRESS_SHELL_STARTED);
		main_child = start_shell(NULL, &original);
	}

	for (;;) {
		int signal_number = sigwaitinfo(&handled, NULL);
		if (signal_number < 0)
			continue; /* EINTR */
		if (signal_number != SIGCHLD)
			finish(0); /* poweroff, reboot or halt: the guest ends cleanly */
		/* Reap every zombie, orphans included; one SIGCHLD may stand for many. */
		int wait_status;
		pid_t pid;
		while ((pid = waitpid(-1, &wait_status, WNOHANG)) > 0)
			if (pid == main_child)
				finish(exit_status(wait_status));
	}
}
