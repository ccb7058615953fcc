# frozen_string_literal: true

$LOAD_PATH.unshift File.expand_path("../lib", __dir__)
# Specs never fill or prune the user's ~/.microsandbox: without an explicit
# MICROSANDBOX_HOME they use their own under the checkout (bin/test sets the same).
ENV["MICROSANDBOX_HOME"] ||= File.expand_path("../tmp/home", __dir__)
require "microsandbox"
require "timeout"
require "tmpdir"
require_relative "support/rootfs"
require_relative "support/vm_helpers"

RSpec.configure do |config|
  config.expect_with(:rspec) { |c| c.syntax = :expect }
  config.disable_monkey_patching!
  config.order = :defined
  config.include MicrosandboxSpec::VmHelpers

  config.define_derived_metadata(file_path: %r{/spec/integration/}) { |meta| meta[:integration] = true }

  # Integration specs boot real VMs. They run everywhere the README's setup ran; a host
  # that cannot run them must opt out explicitly, and every skipped example says why.
  config.before(:each, :integration) do
    reason = ENV.fetch("MICROSANDBOX_SKIP_VM", "")
    skip("MICROSANDBOX_SKIP_VM is set: #{reason}") unless reason.empty?
  end

  # Sandboxes made by specs (names end in -<8 hex>) are removed once stopped.
  config.after(:suite) do
    if ENV.fetch("MICROSANDBOX_SKIP_VM", "").empty?
      Microsandbox::Sandbox.list.each do |info|
        next unless info.name.match?(/-[0-9a-f]{8}\z/)

        info.sandbox.kill if info.running?
        Microsandbox::Sandbox.remove(info.name)
      end
    end
  end

  config.before(:suite) do
    if RSpec.world.filtered_examples.values.flatten.any? { |e| e.metadata[:integration] } &&
       ENV.fetch("MICROSANDBOX_SKIP_VM", "").empty?
      Microsandbox.install unless Microsandbox.installed?
      MicrosandboxSpec::Rootfs.busybox_dir
    end
  end
end
