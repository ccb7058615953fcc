# frozen_string_literal: true

# Boots a microVM from a busybox root filesystem and runs a command in it.
#   bundle exec ruby -Ilib examples/hello.rb
require "microsandbox"
require_relative "../spec/support/rootfs"

rootfs = MicrosandboxSpec::Rootfs.busybox_dir
started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
Microsandbox::Sandbox.create("hello", image: rootfs, replace: true) do |sb|
  booted = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
  out = sb.shell('echo "Hello, World! from $(hostname), kernel $(uname -r)"')
  puts out.stdout
  puts format("booted in %.1fs with %s/%s; exit code %d", booted, sb.info[:vmm], sb.info[:accel], out.exit_code)
end
Microsandbox::Sandbox.remove("hello") # leave nothing behind but the runtime
