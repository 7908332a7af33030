// Asynchronous file I/O for memtrain's swap pipeline: byte ranges of files <-> host buffers.
// Requests are split into blocks and run either through io_uring (one ring thread keeping up to
// queue_depth blocks in flight) or through a pool of threads doing pread/pwrite. Files are opened with
// O_DIRECT when the caller says the buffer, size and offset are aligned; filesystems that refuse O_DIRECT
// (tmpfs) fall back to buffered I/O.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace memtrain {

struct Request {
  std::string path;
  int fd = -1;
  bool write = false;
  bool direct = false;
  int64_t nbytes = 0;
  int64_t offset = 0;
  int64_t blocks_left = 0;  // guarded by IOEngine::mu_
  int error = 0;            // errno of the first failed block; guarded by IOEngine::mu_
  int64_t error_offset = -1;
  bool done = false;
  bool waited = false;  // a second waiter is refused
  std::chrono::steady_clock::time_point start;
};

struct Block {
  std::shared_ptr<Request> request;
  char* buf = nullptr;
  int64_t nbytes = 0;
  int64_t offset = 0;  // file offset
};

struct IOStats {
  int64_t bytes_read = 0;
  int64_t bytes_written = 0;
  int64_t reads = 0;
  int64_t writes = 0;
  double read_seconds = 0.0;   // summed request latency (submit to completion)
  double write_seconds = 0.0;
  int64_t max_blocks_in_flight = 0;
  int64_t direct_requests = 0;
};

class IOEngine {
 public:
  // backend: "auto" (io_uring if the kernel allows it, else threads), "io_uring" or "threads".
  IOEngine(int queue_depth, int64_t block_size, int threads, const std::string& backend);
  ~IOEngine();
  IOEngine(const IOEngine&) = delete;
  IOEngine& operator=(const IOEngine&) = delete;

  // Starts moving nbytes between the buffer at ptr and path at offset; returns a handle for wait().
  int64_t submit(const std::string& path, uintptr_t ptr, int64_t nbytes, int64_t offset, bool write, bool direct);
  // Blocks until the request is complete; throws std::runtime_error naming the file on failure.
  void wait(int64_t handle);
  bool done(int64_t handle);
  IOStats stats();
  const std::string& backend() const { return backend_; }
  int64_t block_size() const { return block_size_; }
  int queue_depth() const { return queue_depth_; }

 private:
  void thread_worker();
  void uring_worker();
  void run_block_sync(const Block& b);
  void finish_block(const std::shared_ptr<Request>& r, int err, int64_t at);

  int queue_depth_;
  int64_t block_size_;
  std::string backend_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Block> queue_;
  std::unordered_map<int64_t, std::shared_ptr<Request>> requests_;
  int64_t next_handle_ = 1;
  bool stopping_ = false;
  int64_t in_flight_ = 0;
  IOStats stats_;
  std::vector<std::thread> workers_;
  void* ring_ = nullptr;  // struct io_uring*, when the io_uring backend runs
};

bool io_uring_compiled();

}  // namespace memtrain
