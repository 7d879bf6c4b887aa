/* Diagnostic for a native crash where gdb is missing (the GPU machine has none):
 *   gcc -shared -fPIC -o /tmp/segv.so bench/segv_backtrace.c
 *   LD_PRELOAD=/tmp/segv.so python3 crashing.py 2> segv.txt
 * On SIGSEGV it prints the backtrace (backtrace_symbols_fd: "lib(+0xoff)" for frames without an
 * exported symbol; resolve those with `addr2line -f -C -i -e lib 0xoff`) and /proc/self/maps to
 * stderr, then exits with 128 + 11. Run the process without `python -X faulthandler`, which
 * installs its own handler. */
#define _GNU_SOURCE
#include <execinfo.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
static void on_segv(int sig) {
  void* b[128];
  int n = backtrace(b, 128);
  write(2, "== SIGSEGV backtrace\n", 21);
  backtrace_symbols_fd(b, n, 2);
  write(2, "== maps\n", 8);
  int fd = open("/proc/self/maps", O_RDONLY);
  char buf[4096];
  ssize_t r;
  while ((r = read(fd, buf, sizeof buf)) > 0) write(2, buf, r);
  _exit(128 + sig);
}
__attribute__((constructor)) static void install(void) {
  struct sigaction sa = {0};
  sa.sa_handler = on_segv;
  sigaction(SIGSEGV, &sa, 0);
}
