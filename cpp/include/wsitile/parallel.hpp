// A minimal fork-join helper: run fn(begin, end) over [0, n) in `threads` contiguous chunks and
// rethrow the first worker exception on the calling thread.
#pragma once

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace wsitile {

// While alive, the calling thread blocks the asynchronous signals (SIGINT, SIGTERM, SIGHUP, SIGQUIT,
// SIGUSR1/2, SIGALRM, SIGCHLD, SIGPIPE); threads started meanwhile inherit the mask from their first
// instruction. Why: the kernel hands a process-directed signal to any thread that does not block
// it, and a worker busy in pread/futex calls often takes it; the signal's handler (Python's Ctrl-C)
// belongs on the thread that started the work. Faults (SIGSEGV, SIGBUS, ...) stay unblocked.
class AsyncSignalsBlocked {
 public:
  AsyncSignalsBlocked() {
    sigset_t set;
    sigemptyset(&set);
    for (int sig : {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGCHLD, SIGPIPE}) sigaddset(&set, sig);
    pthread_sigmask(SIG_BLOCK, &set, &old_);
  }
  ~AsyncSignalsBlocked() { pthread_sigmask(SIG_SETMASK, &old_, nullptr); }
  AsyncSignalsBlocked(const AsyncSignalsBlocked&) = delete;
  AsyncSignalsBlocked& operator=(const AsyncSignalsBlocked&) = delete;

 private:
  sigset_t old_;
};

template <typename Fn>
void parallel_for(int64_t n, int threads, Fn&& fn) {
  if (n <= 0) return;
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (threads == 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::exception_ptr first;
  std::mutex mu;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  const int64_t per = (n + threads - 1) / threads;
  auto run = [&](int64_t b, int64_t e) {
    try {
      fn(b, e);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!first) first = std::current_exception();
    }
  };
  int64_t inline_from = n;  // chunks from here on run on this thread: no more threads could be started
  {
    const AsyncSignalsBlocked workers_leave_signals;  // the workers keep the mask; this thread's is restored
    for (int t = 0; t < threads; ++t) {
      const int64_t b = t * per, e = std::min(n, b + per);
      if (b >= e) break;
      try {
        pool.emplace_back(run, b, e);
      } catch (const std::system_error&) {  // a process or cgroup thread limit: fewer threads, same result
        inline_from = b;
        break;
      }
    }
  }
  for (int64_t b = inline_from; b < n; b += per) run(b, std::min(n, b + per));
  for (auto& th : pool) th.join();
  if (first) std::rethrow_exception(first);
}

}  // namespace wsitile
