# frozen_string_literal: true

# A hostile or runaway guest writes output faster than Ruby reads it: host memory must
# stay bounded (back-pressure, not buffering), and collected output is capped.
RSpec.describe "a guest that floods output" do
  def rss_kib(pid)
    File.read("/proc/#{pid}/status")[/^VmRSS:\s+(\d+)/, 1].to_i
  end

  it "keeps host memory bounded while a slow consumer reads a stream" do
    Microsandbox::Sandbox.create(unique_name("flood"), image: rootfs) do |sb|
      supervisor = sb.info[:supervisor_pid]
      ruby_before = rss_kib(Process.pid)
      sup_before = rss_kib(supervisor)
      handle = sb.exec_stream("sh", ["-c", "yes flood-flood-flood-flood-flood-flood"])
      read = 0
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 4
      handle.each do |ev|
        read += ev.bytes.bytesize
        sleep 0.05 # far slower than the guest writes
        break if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
      end
      # Leaving each early left the command running (blocked by flow control); the sandbox
      # still works meanwhile, and close kills it.
      expect(sb.exec("echo", ["busy"]).stdout).to eq("busy\n")
      handle.close
      warn format("flood: read %d KiB, supervisor +%d KiB, ruby +%d KiB", read / 1024, rss_kib(supervisor) - sup_before, rss_kib(Process.pid) - ruby_before) if ENV["FLOOD_DEBUG"]
      # The guest kept writing the whole time; only what was read crossed into Ruby.
      expect(read).to be > 0
      expect(rss_kib(supervisor) - sup_before).to be < 64 * 1024
      expect(rss_kib(Process.pid) - ruby_before).to be < 128 * 1024
      # The flooding command is gone; the sandbox still works.
      expect(sb.exec("echo", ["calm"]).stdout).to eq("calm\n")
    end
  end
end
