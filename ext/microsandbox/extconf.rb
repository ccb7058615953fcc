# frozen_string_literal: true

# Writes a Makefile that builds the native parts with cargo. rb_sys's helper gem is
# not used (it is not packaged by Debian); cargo is driven directly:
#   - the extension (cdylib) → microsandbox_rb.so
#   - the supervisor `msb-supervisor` and the static guest agent `msb-agent`
#     → libexec/ next to the extension
require "rbconfig"

root = File.expand_path("../..", __dir__)
target_dir = ENV.fetch("CARGO_TARGET_DIR", File.join(root, "target"))
profile = ENV.fetch("MICROSANDBOX_PROFILE", "release")
profile_flag = profile == "release" ? "--release" : ""
profile_dir = profile == "release" ? "release" : "debug"
triple = "#{RbConfig::CONFIG['host_cpu'].sub('amd64', 'x86_64')}-unknown-linux-gnu"
dlext = RbConfig::CONFIG["DLEXT"]
ruby = RbConfig.ruby

File.write("Makefile", <<~MAKE)
  CARGO ?= cargo
  RUBY = #{ruby}
  TARGET_DIR = #{target_dir}
  MANIFEST = #{File.join(root, 'Cargo.toml')}
  SO = microsandbox_rb.#{dlext}
  # mkmf conventions: `gem install` sets sitearchdir; rake-compiler passes target_prefix=.
  sitearchdir = #{RbConfig::CONFIG['sitearchdir']}
  target_prefix = /microsandbox
  RUBYARCHDIR = $(sitearchdir)$(target_prefix)

  all: $(SO) libexec/msb-supervisor libexec/msb-agent libexec/virtiofsd

  # The virtio-fs daemon for `volumes:`, from crates.io (needs libseccomp-dev and
  # libcap-ng-dev). `cargo install` does nothing when that version is already installed.
  VIRTIOFSD_VERSION = 1.14.0
  libexec/virtiofsd:
  \tCARGO_TARGET_DIR=$(TARGET_DIR)/virtiofsd-build $(CARGO) install --locked --quiet --root $(TARGET_DIR)/virtiofsd virtiofsd --version $(VIRTIOFSD_VERSION)
  \tmkdir -p libexec && cp $(TARGET_DIR)/virtiofsd/bin/virtiofsd libexec/virtiofsd

  $(SO): FORCE
  \tRUBY=$(RUBY) CARGO_TARGET_DIR=$(TARGET_DIR) $(CARGO) build #{profile_flag} --manifest-path $(MANIFEST) -p microsandbox-rb -p microsandbox-supervisor
  \tcp $(TARGET_DIR)/#{profile_dir}/libmicrosandbox_rb.so $(SO)

  libexec/msb-supervisor: $(SO)
  \tmkdir -p libexec && cp $(TARGET_DIR)/#{profile_dir}/msb-supervisor libexec/msb-supervisor

  # `--profile guest` (Cargo.toml): the agent runs inside the VM, optimised for size.
  libexec/msb-agent: FORCE
  \tRUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$(TARGET_DIR) $(CARGO) build --profile guest --manifest-path $(MANIFEST) -p microsandbox-agent --target #{triple}
  \tmkdir -p libexec && cp $(TARGET_DIR)/#{triple}/guest/msb-agent libexec/msb-agent

  # Copy then rename: a running process that has the old files mapped keeps them intact.
  install: all
  \tmkdir -p $(RUBYARCHDIR)/libexec
  \tcp $(SO) $(RUBYARCHDIR)/$(SO).tmp && mv -f $(RUBYARCHDIR)/$(SO).tmp $(RUBYARCHDIR)/$(SO)
  \tfor b in msb-supervisor msb-agent virtiofsd; do cp libexec/$$b $(RUBYARCHDIR)/libexec/$$b.tmp && mv -f $(RUBYARCHDIR)/libexec/$$b.tmp $(RUBYARCHDIR)/libexec/$$b; done

  clean:
  \trm -rf $(SO) libexec

  FORCE:
  .PHONY: all install clean FORCE
MAKE
