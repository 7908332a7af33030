// See io_engine.h. Errors carry the file name, the offset and the system's reason: a swap file that cannot be
// read back must stop training with a clear message, never hand back wrong bytes.
#include "io_engine.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <unordered_set>

#ifdef MEMTRAIN_HAVE_URING
#include <liburing.h>
#endif

namespace memtrain {

namespace {
constexpr int64_t kAlign = 4096;
constexpr int64_t kMaxBlock = int64_t(1) << 30;  // one io_uring read/write moves at most UINT_MAX bytes

std::string describe(const Request& r, int err, int64_t at) {
  std::ostringstream s;
  s << "memtrain swap: " << (r.write ? "write to " : "read of ") << r.path << " failed at offset " << at << " ("
    << r.nbytes << " bytes requested from offset " << r.offset << "): "
    << (err == ENODATA ? "unexpected end of file" : std::strerror(err));
  return s.str();
}
}  // namespace

bool io_uring_compiled() {
#ifdef MEMTRAIN_HAVE_URING
  return true;
#else
  return false;
#endif
}

IOEngine::IOEngine(int queue_depth, int64_t block_size, int threads, const std::string& backend)
    : queue_depth_(queue_depth), block_size_(block_size) {
  if (queue_depth < 1) throw std::invalid_argument("queue_depth must be >= 1");
  if (block_size < kAlign || block_size % kAlign != 0 || block_size > kMaxBlock)
    throw std::invalid_argument("block_size must be a positive multiple of 4096 bytes, at most 1 GiB");
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  if (backend != "auto" && backend != "io_uring" && backend != "threads")
    throw std::invalid_argument("backend must be 'auto', 'io_uring' or 'threads', got '" + backend + "'");
#ifdef MEMTRAIN_HAVE_URING
  if (backend != "threads") {
    auto* ring = new io_uring;
    int rc = io_uring_queue_init(static_cast<unsigned>(queue_depth), ring, 0);
    if (rc == 0) {
      ring_ = ring;
      backend_ = "io_uring";
      workers_.emplace_back(&IOEngine::uring_worker, this);
      return;
    }
    delete ring;
    if (backend == "io_uring")
      throw std::runtime_error(std::string("io_uring is not usable here: ") + std::strerror(-rc));
  }
#else
  if (backend == "io_uring") throw std::runtime_error("memtrain._C was built without liburing");
#endif
  backend_ = "threads";
  for (int i = 0; i < threads; ++i) workers_.emplace_back(&IOEngine::thread_worker, this);
}

IOEngine::~IOEngine() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : workers_) t.join();
#ifdef MEMTRAIN_HAVE_URING
  if (ring_ != nullptr) {
    io_uring_queue_exit(static_cast<io_uring*>(ring_));
    delete static_cast<io_uring*>(ring_);
  }
#endif
  for (auto& kv : requests_)
    if (!kv.second->done && kv.second->fd >= 0) close(kv.second->fd);
}

int64_t IOEngine::submit(const std::string& path, uintptr_t ptr, int64_t nbytes, int64_t offset, bool write,
                         bool direct) {
  if (nbytes < 0 || offset < 0) throw std::invalid_argument("nbytes and offset must be >= 0");
  if (direct && (ptr % kAlign != 0 || nbytes % kAlign != 0 || offset % kAlign != 0))
    throw std::invalid_argument("direct I/O needs the buffer, size and offset aligned to 4096 bytes");
  auto r = std::make_shared<Request>();
  r->path = path;
  r->write = write;
  r->nbytes = nbytes;
  r->offset = offset;
  r->start = std::chrono::steady_clock::now();
  int flags = write ? (O_WRONLY | O_CREAT | O_CLOEXEC) : (O_RDONLY | O_CLOEXEC);
  int fd = -1;
  if (direct) {
    fd = open(path.c_str(), flags | O_DIRECT, 0600);
    if (fd < 0 && errno != EINVAL) {
      throw std::runtime_error("memtrain swap: cannot open " + path + (write ? " for writing: " : " for reading: ") +
                               std::strerror(errno));
    }
  }
  r->direct = fd >= 0;
  if (fd < 0) fd = open(path.c_str(), flags, 0600);  // no O_DIRECT asked, or the filesystem refuses it
  if (fd < 0)
    throw std::runtime_error("memtrain swap: cannot open " + path + (write ? " for writing: " : " for reading: ") +
                             std::strerror(errno));
  r->fd = fd;
  int64_t handle;
  {
    std::lock_guard<std::mutex> lk(mu_);
    handle = next_handle_++;
    requests_[handle] = r;
    if (r->direct) stats_.direct_requests++;
    if (nbytes == 0) {
      close(fd);
      r->fd = -1;
      r->done = true;
      return handle;
    }
    char* buf = reinterpret_cast<char*>(ptr);
    for (int64_t done = 0; done < nbytes; done += block_size_) {
      int64_t n = std::min(block_size_, nbytes - done);
      queue_.push_back(Block{r, buf + done, n, offset + done});
      r->blocks_left++;
    }
  }
  work_cv_.notify_all();
  return handle;
}

void IOEngine::wait(int64_t handle) {
  std::unique_lock<std::mutex> lk(mu_);
  auto it = requests_.find(handle);
  if (it == requests_.end() || it->second->waited)
    throw std::invalid_argument("unknown swap handle (already waited for?)");
  std::shared_ptr<Request> r = it->second;
  r->waited = true;
  done_cv_.wait(lk, [&] { return r->done; });
  requests_.erase(handle);  // by key: submits while we slept may have rehashed the map
  if (r->error != 0) throw std::runtime_error(describe(*r, r->error, r->error_offset));
}

bool IOEngine::done(int64_t handle) {
  std::lock_guard<std::mutex> lk(mu_);
  auto it = requests_.find(handle);
  if (it == requests_.end()) throw std::invalid_argument("unknown swap handle (already waited for?)");
  return it->second->done;
}

IOStats IOEngine::stats() {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

void IOEngine::finish_block(const std::shared_ptr<Request>& r, int err, int64_t at) {
  std::lock_guard<std::mutex> lk(mu_);
  in_flight_--;
  if (err != 0 && r->error == 0) {
    r->error = err;
    r->error_offset = at;
  }
  if (--r->blocks_left > 0) return;
  close(r->fd);
  r->fd = -1;
  r->done = true;
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - r->start).count();
  if (r->error == 0) {
    if (r->write) {
      stats_.bytes_written += r->nbytes;
      stats_.writes++;
      stats_.write_seconds += seconds;
    } else {
      stats_.bytes_read += r->nbytes;
      stats_.reads++;
      stats_.read_seconds += seconds;
    }
  }
  done_cv_.notify_all();
}

void IOEngine::run_block_sync(const Block& b) {
  const Request& r = *b.request;
  char* buf = b.buf;
  int64_t left = b.nbytes;
  int64_t at = b.offset;
  while (left > 0) {
    ssize_t n = r.write ? pwrite(r.fd, buf, static_cast<size_t>(left), at)
                        : pread(r.fd, buf, static_cast<size_t>(left), at);
    if (n < 0) {
      if (errno == EINTR) continue;
      finish_block(b.request, errno, at);
      return;
    }
    if (n == 0 || (r.direct && !r.write && n < left)) {
      // The file ended before the range did (an O_DIRECT read cannot continue at the unaligned remainder):
      // the swap file is shorter than what was written to it.
      finish_block(b.request, r.write ? EIO : ENODATA, at + n);
      return;
    }
    buf += n;
    left -= n;
    at += n;
  }
  finish_block(b.request, 0, 0);
}

void IOEngine::thread_worker() {
  for (;;) {
    Block b;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      b = std::move(queue_.front());
      queue_.pop_front();
      in_flight_++;
      stats_.max_blocks_in_flight = std::max(stats_.max_blocks_in_flight, in_flight_);
    }
    run_block_sync(b);
  }
}

void IOEngine::uring_worker() {
#ifdef MEMTRAIN_HAVE_URING
  auto* ring = static_cast<io_uring*>(ring_);
  int64_t in_ring = 0;  // only this thread changes it
  std::unordered_set<Block*> pending;  // prepared blocks, owned by the ring until their completion arrives
  auto fail_ring = [&](int err) {
    // Submitting or waiting failed for a reason other than an interruption (a broken ring): fail every block
    // it holds so that waiters get an error naming the file instead of hanging.
    io_uring_cqe* c = nullptr;
    while (io_uring_peek_cqe(ring, &c) == 0 && c != nullptr) io_uring_cqe_seen(ring, c);
    for (Block* op : pending) {
      finish_block(op->request, err, op->offset);
      delete op;
    }
    pending.clear();
    in_ring = 0;
  };
  auto submit_all = [&](size_t at_least) {
    int rc;
    do {
      rc = io_uring_submit(ring);
    } while (rc == -EINTR || rc == -EAGAIN);
    if (rc < 0 || (at_least > 0 && rc == 0 && io_uring_sq_ready(ring) > 0)) fail_ring(rc < 0 ? -rc : EIO);
  };
  auto prepare = [&](Block* op) {
    io_uring_sqe* sqe = io_uring_get_sqe(ring);
    const Request& r = *op->request;
    if (r.write)
      io_uring_prep_write(sqe, r.fd, op->buf, static_cast<unsigned>(op->nbytes), static_cast<uint64_t>(op->offset));
    else
      io_uring_prep_read(sqe, r.fd, op->buf, static_cast<unsigned>(op->nbytes), static_cast<uint64_t>(op->offset));
    io_uring_sqe_set_data(sqe, op);
    pending.insert(op);
    in_ring++;
  };
  for (;;) {
    std::vector<Block*> batch;
    {
      std::unique_lock<std::mutex> lk(mu_);
      work_cv_.wait(lk, [&] { return stopping_ || !queue_.empty() || in_ring > 0; });
      if (stopping_ && queue_.empty() && in_ring == 0) return;
      while (in_ring + static_cast<int64_t>(batch.size()) < queue_depth_ && !queue_.empty()) {
        batch.push_back(new Block(std::move(queue_.front())));
        queue_.pop_front();
        in_flight_++;
      }
      stats_.max_blocks_in_flight = std::max(stats_.max_blocks_in_flight, in_flight_);
    }
    for (Block* op : batch) prepare(op);
    if (!batch.empty()) submit_all(batch.size());
    if (in_ring == 0) continue;
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(ring, &cqe);
    if (rc == -EINTR || rc == -EAGAIN) continue;
    if (rc < 0) fail_ring(-rc);  // the ring is unusable: fail what it holds rather than spin or hang
    bool resubmit = false;
    while (rc == 0 && cqe != nullptr) {
      auto* op = static_cast<Block*>(io_uring_cqe_get_data(cqe));
      int res = cqe->res;
      io_uring_cqe_seen(ring, cqe);
      pending.erase(op);
      in_ring--;
      if (res == -EAGAIN || res == -EINTR) {
        prepare(op);
        resubmit = true;
      } else if (res < 0) {
        finish_block(op->request, -res, op->offset);
        delete op;
      } else if (res == 0 && op->nbytes > 0) {
        finish_block(op->request, op->request->write ? EIO : ENODATA, op->offset);
        delete op;
      } else if (res < op->nbytes && op->request->direct && !op->request->write) {
        // O_DIRECT cannot continue at an unaligned offset: a short direct read means the file ended early.
        finish_block(op->request, ENODATA, op->offset + res);
        delete op;
      } else if (res < op->nbytes) {  // short transfer: continue where it stopped
        op->buf += res;
        op->nbytes -= res;
        op->offset += res;
        prepare(op);
        resubmit = true;
      } else {
        finish_block(op->request, 0, 0);
        delete op;
      }
      cqe = nullptr;
      rc = io_uring_peek_cqe(ring, &cqe);
    }
    if (resubmit) submit_all(1);
  }
#endif
}

}  // namespace memtrain
