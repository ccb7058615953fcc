# frozen_string_literal: true

require "fileutils"

module MicrosandboxSpec
  # Builds a minimal root filesystem from Debian's busybox-static: /bin/busybox, a
  # symlink per applet, /etc/passwd. Built once per checkout under tmp/.
  module Rootfs
    BUSYBOX = "/bin/busybox"

    module_function

    def busybox_dir
      dir = File.expand_path("../../tmp/rootfs/busybox", __dir__)
      return dir if File.exist?(File.join(dir, ".complete"))

      build_busybox(dir)
      dir
    end

    def build_busybox(dir)
      unless File.executable?(BUSYBOX) && `file -L #{BUSYBOX}`.include?("statically linked")
        raise "#{BUSYBOX} is missing or not static: install Debian's busybox-static package (bin/setup does)"
      end

      FileUtils.rm_rf(dir)
      %w[bin sbin etc tmp root proc sys dev usr/bin usr/sbin].each { |d| FileUtils.mkdir_p(File.join(dir, d)) }
      FileUtils.cp(BUSYBOX, File.join(dir, "bin/busybox"))
      applets = `#{BUSYBOX} --list`.split
      applets.each do |applet|
        link = File.join(dir, "bin", applet)
        File.symlink("busybox", link) unless File.exist?(link) || applet == "busybox"
      end
      File.write(File.join(dir, "etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
      File.write(File.join(dir, "etc/group"), "root:x:0:\nnogroup:x:65534:\n")
      File.write(File.join(dir, "etc/hostname"), "sandbox\n")
      File.chmod(0o1777, File.join(dir, "tmp"))
      FileUtils.touch(File.join(dir, ".complete"))
    end
  end
end
