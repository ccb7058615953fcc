# frozen_string_literal: true

require "securerandom"

module MicrosandboxSpec
  # Helpers for specs that boot VMs.
  module VmHelpers
    def rootfs
      Rootfs.busybox_dir
    end

    def unique_name(prefix = "spec")
      "#{prefix}-#{SecureRandom.hex(4)}"
    end

    def pid_alive?(pid)
      Process.kill(0, pid)
      # A zombie is dead for our purposes.
      !File.read("/proc/#{pid}/stat").split[2].eql?("Z")
    rescue Errno::ESRCH, Errno::ENOENT
      false
    end

    def wait_until(timeout: 15, interval: 0.1)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      loop do
        return true if yield
        return false if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

        sleep interval
      end
    end

    def sandbox_dir(name)
      File.join(Microsandbox.home, "sandboxes", name)
    end

    # Processes whose command line mentions `needle` (the sandbox dir appears in QEMU's).
    def processes_mentioning(needle)
      Dir["/proc/[0-9]*/cmdline"].filter_map do |f|
        cmd = File.binread(f).tr("\0", " ")
        f.split("/")[2].to_i if cmd.include?(needle)
      rescue Errno::ENOENT, Errno::ESRCH, Errno::EACCES
        nil
      end
    end
  end
end
