# frozen_string_literal: true

require_relative "lib/microsandbox/version"

Gem::Specification.new do |spec|
  spec.name = "microsandbox-rb"
  spec.version = Microsandbox::VERSION
  spec.authors = ["microsandbox-rb developers"]
  spec.summary = "Real microVM sandboxes for Ruby: run untrusted code in its own Linux kernel"
  spec.description = "Boots QEMU microVMs (KVM, HVF or software emulation) from Ruby and runs " \
                     "commands in them through a guest agent. No daemon: each sandbox is a child process."
  spec.license = "Apache-2.0"
  spec.homepage = "https://github.com/microsandbox-rb/microsandbox-rb"
  spec.required_ruby_version = ">= 3.1"
  spec.metadata["rubygems_mfa_required"] = "true"

  spec.files = Dir[
    "lib/**/*.rb", "exe/*", "sig/**/*.rbs", "ext/**/*.{rb,rs,toml}", "crates/**/*.{rs,toml}",
    "Cargo.toml", "Cargo.lock", "README.md", "DESIGN.md", "CHANGELOG.md", "LICENSE"
  ]
  spec.bindir = "exe"
  spec.executables = ["microsandbox"]
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/microsandbox/extconf.rb"]
end
