# frozen_string_literal: true

require "json"

module Microsandbox
  # A microVM sandbox running on this host.
  #
  # Each sandbox is a real VM (QEMU: KVM when available, software emulation otherwise)
  # with its own Linux kernel, owned by the process that created it: it is stopped when
  # the {Sandbox.create} block returns, and killed if this process dies.
  #
  # @example
  #   Microsandbox::Sandbox.create("hello", image: "/srv/rootfs") do |sb|
  #     sb.exec("echo", ["hi"]).stdout # => "hi\n"
  #   end
  class Sandbox
    # Default seconds {#stop} waits for a clean shutdown before killing the VM.
    DEFAULT_STOP_TIMEOUT = 10

    # File extensions of disk-image roots (`image: "/srv/root.qcow2"`), as in the
    # reference gem. The image must be an ext2/3/4 filesystem without a partition table;
    # the sandbox writes to an overlay, never to the image.
    DISK_IMAGE_EXTENSIONS = %w[raw qcow2 vmdk].freeze

    # `security:` profiles. "restricted": every command and the main process run with no
    # new privileges and no capabilities at all (also as root); "default": as root can.
    SECURITY_PROFILES = %w[default restricted].freeze

    # `log_level:` values, least verbose first.
    LOG_LEVELS = %w[error warn info debug trace].freeze

    class << self
      # Creates and boots a sandbox.
      #
      # With a block, yields the running sandbox, stops it when the block exits (also on
      # exception, and also when `detached:`, as in the reference gem) and returns the
      # block's value.
      # Without a block, returns the sandbox and the caller must {#stop} or {#kill} it.
      # Stopped sandboxes keep their root disk until {Sandbox.remove}.
      #
      # @param name [String, Symbol] 1-128 bytes of UTF-8 without control characters
      #   (`to_s` of a Symbol)
      # @param image [String] an OCI image reference ("alpine", "registry:5000/app:1",
      #   "app@sha256:…"), pulled as needed; or the path (starting with "/" or ".") of a
      #   local root filesystem directory, of which the guest gets a private copy; or the
      #   path of a disk image ending in .raw, .qcow2 or .vmdk ({DISK_IMAGE_EXTENSIONS}):
      #   an ext2/3/4 filesystem without a partition table, booted through a copy-on-write
      #   overlay (the image is only read; it must stay in place for {Sandbox.start})
      # @param fstype [String, Symbol, nil] filesystem of a disk-image root: "ext4", "ext3"
      #   or "ext2" (detected from the image when nil); anything else is {UnsupportedError}
      #   (the guest kernel mounts ext roots only). ArgumentError for a root that is not a
      #   disk image
      # @param pull_policy [String, Symbol] "always", "if_missing" (default) or "never"
      # @param registry_auth [Hash, nil] `{ username:, password: }` (else ~/.docker/config.json)
      # @param registry_insecure [Boolean] plain HTTP to the registry
      # @param registry_ca_certs [String, Array<String>, nil] extra trusted CAs (PEM)
      # @param cpus [Integer] virtual CPUs (1-255)
      # @param memory [Integer] guest memory in MiB (128 and up)
      # @param env [Hash{String=>String}] environment for every command
      # @param workdir [String, nil] default working directory of commands (absolute)
      # @param shell [String] absolute guest path of the shell used by {#shell} and
      #   {#shell_stream}, kept for {Sandbox.get}/{Sandbox.start} (default "/bin/sh")
      # @param accel [String, Symbol, nil] "auto" (default; also MICROSANDBOX_ACCEL), "kvm", "hvf" or "tcg"
      # @param boot_timeout [Numeric, nil] seconds to wait for the guest agent (default 180)
      # @param max_duration [Numeric, nil] seconds after which the sandbox stops by itself
      # @param idle_timeout [Numeric, nil] seconds without any running command or call
      #   after which the sandbox stops by itself
      # @param oci_upper_size [Integer, nil] MiB the sandbox may write on top of a registry
      #   image (default 4096): a full disk is ENOSPC in the guest. Local directory roots
      #   ignore it (they get a private disk with 512 MiB free)
      # @param network [String, Symbol, NetworkPolicy, Hash, nil] the network policy (see
      #   {NetworkPolicy.coerce}; default "public_only": DNS and the public internet, nothing
      #   local). Every policy but "none" gives the guest a NIC (eth0, a default route, DNS
      #   through the gateway, `host.microsandbox.internal` for the host's loopback, which
      #   only a policy allowing the `host` group reaches); "none" boots without one.
      #   Refused connections fail at once (ECONNREFUSED) and leave a `system` log entry
      # @param dns [Hash, nil] `{ nameservers: ["1.1.1.1", "127.0.0.1:5353", "dns.example:53"],
      #   query_timeout_ms: 5000, rebind_protection: true }` (all optional; default: the
      #   host's resolvers from /etc/resolv.conf)
      # @raise [NetworkPolicyError] for a malformed `network:` or `dns:` (names the key, not
      #   the value)
      # @param ports [Hash, nil] published TCP ports, `{ host_port => guest_port }`: a
      #   connection to the host port (bound on 127.0.0.1, as in the reference gem) reaches
      #   the guest port. A key `"address:port"` (`"0.0.0.0:8080"`, `"[::1]:8080"`) binds
      #   another host address. Keys and values may be Integers or Strings of digits.
      #   Inbound connections obey the policy's ingress rules (the peer's address, the
      #   guest port); refused ones are reset and logged. The listeners live in the
      #   sandbox's supervisor and close with the sandbox
      # @param ports_udp [Hash, nil] published UDP ports, same forms as `ports:`
      # @param ipv4_pool [String, nil] IPv4 CIDR the guest's and gateway's addresses come
      #   from (the first /30 of it: gateway .1, guest .2; default 172.16.0.0/30)
      # @param ipv6_pool [String, nil] IPv6 CIDR of the guest's link (dual stack: gateway
      #   `::1`, guest `::2` of the pool, on-link /126; default fd42:6d73:62::/64). At most
      #   /126; not in ::/8, fe80::/10 or ff00::/8 ({InvalidConfigError} naming the option)
      # @param max_connections [Integer, nil] concurrent TCP connections through the NIC,
      #   both ways (1-4096, default 256); a connection beyond it is refused (RST) and logged
      # @raise [PortInUseError] a published host port is taken (nothing is left running)
      # @param hostname [String, nil] guest hostname (default: the sandbox name)
      # @param template [Boolean, nil] warm start (registry images): restore a VM saved once
      #   per configuration instead of booting (see {Templates}). `false` always boots cold;
      #   `true` uses templates even when `MICROSANDBOX_TEMPLATES=off`; nil (default): on
      #   unless that variable says off. `#info[:start]` tells "restored" or "booted"
      # @param warm_up [Boolean] run `true` once inside (as a command would: the sandbox's
      #   `PATH`, user, profile and rlimits; in `/`) before create returns (and before a
      #   later {start} boots it again; never into a resumed or forked VM), so the first
      #   command of yours does not pay for the emulator translating the exec path anew
      #   (a restored sandbox's first exec takes 5-20x a later one). It leaves no process,
      #   log entry or session id behind; an image without `true` only warms part of the
      #   path. Costs that much longer a create: {Pool} sets it, whose sandboxes wait for a
      #   caller anyway. Default false
      # @param user [String, nil] default guest user of commands (default: the image's
      #   `User`, else root)
      # @param labels [Hash{String=>String}] free-form labels, see {Sandbox.list_with}
      # @param detached [Boolean] let the sandbox outlive this process
      # @param replace [Boolean] stop and remove an existing sandbox of the same name first
      # @param replace_with_timeout [Numeric, nil] like `replace: true`, waiting this many
      #   seconds for the old sandbox to stop cleanly before killing it
      # @param entrypoint [Array<String>, nil] the main process started after every boot
      #   (also by {Sandbox.start}); replaces the image's Entrypoint and drops its Cmd, like
      #   `docker run --entrypoint`. Default: the image's Entrypoint + Cmd. `[]` runs nothing.
      #   Its output goes to {#logs}; its exit does not stop the sandbox.
      # @param scripts [Hash{String=>String}] `name => source`, written to
      #   `/.msb/scripts/<name>` (mode 0755) at create; that directory is appended to PATH,
      #   so `sb.shell("name")` runs one. Names are file names (no "/", not "." or "..")
      # @param init [String, Symbol, Hash, nil] hand guest PID 1 to an init system once the
      #   guest has booted: an absolute guest path ("/lib/systemd/systemd"), "auto" (the
      #   first of /sbin/init, /lib/systemd/systemd, /usr/lib/systemd/systemd, /init), or
      #   `{ cmd:, args: [], env: {} }`. The agent goes on as its child; commands, {FS} and
      #   the main process work as before. If the init exits the VM ends (a crash). A
      #   missing init fails the boot ({BootFailedError})
      # @param security [String, Symbol, nil] "default" (nil) or "restricted": every command
      #   and the main process start with no new privileges (setuid programs and file
      #   capabilities grant nothing) and every capability dropped, bounding set included,
      #   so root in the guest cannot mount, chown others' files, use raw sockets, load
      #   modules or trace other users' processes. {FS} calls and patches are not commands
      #   and are not restricted
      # @param ephemeral [Boolean] remove the sandbox once it stops, however it stops: its
      #   root disk and logs go at once, its record at the next lookup, so {Sandbox.get}
      #   raises {SandboxNotFoundError}, {Sandbox.list} omits it and the name is free. A
      #   handle already open still reports how the run ended ({#last_stop},
      #   {#stop_and_wait})
      # @param patches [Array<Hash>, nil] root filesystem changes made at create, in order,
      #   before `create` returns: Hashes from the {Patch} factories or built by hand
      # @param secrets [Array<Hash>, nil] secrets the guest never sees (README "Secrets"):
      #   each `{ env:, value:, host: | hosts: | host_patterns:, placeholder: ("$MSB_<env>"),
      #   require_tls: (true), inject_headers: (true), inject_basic_auth: (true),
      #   inject_query: (false), inject_body: (false), on_violation: }`. The guest's `env`
      #   gets the placeholder; the value is held by the supervisor in memory only and is
      #   never stored, so {Sandbox.start} needs `secrets:` again
      # @param on_secret_violation [String, Symbol, Hash, nil] "block", "block_and_log"
      #   (default), "block_and_terminate", "passthrough", or `{ passthrough_hosts: [],
      #   passthrough_host_patterns: [], passthrough_all_hosts: true }`
      # @param tls [Hash, nil] interception options: `bypass:` (host patterns never
      #   intercepted), `verify_upstream:` (true), `intercepted_ports:` ([443]),
      #   `block_quic:` (true), `upstream_ca_cert:` / `intercept_ca_cert:` /
      #   `intercept_ca_key:` (a path or PEM text; a key file must be mode 0600; a key given
      #   as text is not stored, so {Sandbox.start} needs it again)
      # @param trust_host_cas [Boolean] copy the host's CA roots into the guest (false)
      # @param from_snapshot [String, nil] boot from a {Snapshot} (its name, digest
      #   "sha256:…" or artifact directory) instead of `image:` (exclusive; one of them is
      #   required). The snapshot's disk is checked against its digest first
      #   ({SnapshotIntegrityError}); env, workdir, user and entrypoint default to the
      #   snapshotted sandbox's. {SnapshotNotFoundError} when there is no such snapshot
      # @param volumes [Hash{String=>String, Hash}, nil] guest path => mount: a host
      #   directory String (bind mount) or a Hash with one of `bind: "/host/dir"`,
      #   `named: "volume"` ({Volume}), `tmpfs: true` (optional `size_mib:`), `disk: "/x.img"`
      #   (optional `format: "raw"|"qcow2"`, `fstype: "ext4"|"ext3"|"ext2"`), and the flags
      #   `readonly:` (or `ro:`), `noexec:`, `nosuid:`, `nodev:`. Checked before anything
      #   starts: {VolumeNotFoundError}, {VolumeInUseError} (an image-backed volume attached
      #   to another sandbox), {InvalidConfigError} (a guest path that is relative, `/`,
      #   under /proc, /dev or /sys, or overlaps another; a bind path that is missing or not
      #   a directory), TypeError
      # @yieldparam sandbox [Sandbox]
      # @return [Sandbox, Object] the sandbox, or the block's value
      # @raise [UnsupportedError] a disk image whose filesystem the guest cannot mount
      # @raise [ImageNotFoundError] a disk image or root directory that does not exist
      # @raise [InvalidConfigError, ImageNotFoundError, SandboxAlreadyExistsError,
      #   RuntimeUnavailableError, BootFailedError, PatchFailedError, TlsError]
      # @raise [ArgumentError] a patch that is not a Hash, of an unknown kind, or with
      #   missing or unknown keys; a malformed `secrets:`/`tls:` option (names the key,
      #   never a value)
      def create(name, image: nil, cpus: 1, memory: 512, env: {}, workdir: nil, shell: "/bin/sh",
                 accel: nil, boot_timeout: nil, max_duration: nil, idle_timeout: nil, hostname: nil, user: nil, labels: {},
                 detached: false, replace: false, replace_with_timeout: nil, pull_policy: nil,
                 registry_auth: nil, registry_insecure: false, registry_ca_certs: nil,
                 entrypoint: nil, scripts: {}, patches: [], oci_upper_size: nil, network: nil, dns: nil,
                 ports: nil, ports_udp: nil, ipv4_pool: nil, ipv6_pool: nil, max_connections: nil,
                 rlimits: nil, log_level: nil, quiet_logs: false, security: nil, ephemeral: false, init: nil,
                 fstype: nil, secrets: nil, on_secret_violation: nil, tls: nil, trust_host_cas: false,
                 template: nil, volumes: nil, from_snapshot: nil, warm_up: false, &block)
        snapshot = snapshot_source!(image, from_snapshot)
        fstype_option!(image, fstype)
        config = build_config(name, image || "", cpus, memory, Validate.coerce_values!("env", env), workdir, accel, boot_timeout)
        config.merge!(run_options(rlimits, log_level, quiet_logs))
        config.merge!(profile_options(security, ephemeral))
        config["fstype"] = fstype.to_s unless fstype.nil?
        config["init"] = init_option(init) unless init.nil?
        config["secrets"] = Secrets.secrets!(secrets)
        config["on_secret_violation"] = Secrets.violation!("on_secret_violation", on_secret_violation) unless on_secret_violation.nil?
        config["tls"] = Secrets.tls!(tls) unless tls.nil?
        config["trust_host_cas"] = Secrets.bool!("trust_host_cas", trust_host_cas)
        config["hostname"] = Validate.utf8_string!("hostname", hostname) if hostname
        config["template"] = Templates.option!(template) unless template.nil?
        config["warm_up"] = true if warm_up
        config["user"] = Validate.utf8_string!("user", user) if user
        config["entrypoint"] = Validate.string_array!("entrypoint", entrypoint).map { |a| Validate.utf8!("entrypoint", a) } if entrypoint
        config["oci_upper_size_mib"] = Validate.positive_integer!("oci_upper_size", oci_upper_size) if oci_upper_size
        config["network"] = NetworkPolicy.coerce(network).to_h unless network.nil?
        config.merge!(NetOptions.config(ports, ports_udp, ipv4_pool, max_connections, ipv6_pool))
        unless dns.nil?
          raise TypeError, "dns must be a Hash (got #{dns.class})" unless dns.is_a?(Hash)

          config["dns"] = dns.transform_keys(&:to_s)
        end
        config.merge!(Image.registry_options(pull_policy: pull_policy, registry_auth: registry_auth,
                                             registry_insecure: registry_insecure,
                                             registry_ca_certs: registry_ca_certs))
        { "max_duration_ms" => ["max_duration", max_duration], "idle_timeout_ms" => ["idle_timeout", idle_timeout] }
          .each do |key, (label, value)|
            seconds = Validate.timeout!(label, value)
            config[key] = (seconds * 1000).ceil if seconds
          end
        config["shell"] = Validate.guest_path!("shell", shell)
        config["scripts"] = Validate.scripts!("scripts", scripts)
        config["patches"] = Patch.to_config_list!(patches || [])
        config["volumes"] = Volume::Mounts.coerce(volumes) unless volumes.nil?
        config["from_snapshot"] = snapshot if snapshot
        placement = build_placement(Validate.coerce_values!("labels", labels), detached, replace, replace_with_timeout)
        # Options cross to the engine as JSON text: refuse one that is not UTF-8 before
        # anything (the runtime check included) starts.
        Validate.utf8_tree!(config)
        Microsandbox.ensure_runtime!
        config["supervisor"] = Microsandbox.runtime_path
        sandbox = Instrumentation.instrument("create.microsandbox", Instrumentation.create_payload(config, placement)) do |payload|
          new(Native::Sandbox.create(Validate.json!(config), Validate.json!(placement))).tap do |sb|
            payload&.merge!(accel: sb.info[:accel], boot_ms: sb.info[:boot_ms])
          end
        end
        scoped(sandbox, &block)
      end

      # {create} with pull progress, as in the reference gem: returns a {PullSession} at
      # once; iterate it for progress ({PullProgress}, which also reads as the reference's
      # event Hash), then call {PullSession#sandbox} for the booted sandbox (the caller
      # stops it). A local root directory has nothing to pull: the session is empty.
      # Options are those of {create}; they are checked when {PullSession#sandbox} boots.
      # @param name [String, Symbol]
      # @return [PullSession]
      # @raise [ArgumentError] when given a block (use {create} for the block form)
      def create_with_progress(name, **options)
        if block_given?
          raise ArgumentError, "create_with_progress takes no block: iterate the returned PullSession " \
                               "for progress, then call #sandbox and stop it when done"
        end
        image = Validate.utf8_string!("image", options.fetch(:image) { raise ArgumentError, "missing keyword: :image" })
        registry = options.slice(*Image::REGISTRY_OPTIONS)
        native = unless local_path?(image)
                   Native::PullSession.start(Microsandbox.home, image, Validate.json!(Image.registry_options(**registry)))
                 end
        # The pull stored the image: the create must not fetch it a second time.
        create_options = native ? options.merge(pull_policy: "if_missing") : options
        PullSession.new(native, create: -> { create(name, **create_options) })
      end

      # Boots a stopped sandbox again, with its root disk and its create options (the
      # main process runs again; patches and scripts are already in its root).
      # Takes a block like {create}.
      # @param name [String]
      # @param detached [Boolean]
      # @param shell [String, nil] overrides the `shell:` given at create for this handle
      # @param secrets [Array<Hash>, nil] the `secrets:` given at create, with their values
      #   (values are never stored: a sandbox created with secrets needs them again)
      # @param tls [Hash, nil] `{ intercept_ca_key: }` when it was given as PEM text at create
      # @return [Sandbox, Object]
      # @raise [SandboxNotFoundError, SandboxStillRunningError]
      # @raise [InvalidConfigError] a secret of the sandbox is missing from `secrets:`
      def start(name, detached: false, shell: nil, secrets: nil, tls: nil, &block)
        name = Validate.name!(name)
        shell = Validate.guest_path!("shell", shell) if shell
        again = { "secrets" => Secrets.secrets!(secrets) }
        key = Secrets.tls!(tls)&.fetch("intercept_ca_key", nil)
        again["intercept_ca_key"] = key if key
        Microsandbox.ensure_runtime!
        native = Instrumentation.instrument("start.microsandbox", { name: name, detached: detached ? true : false }) do
          Native::Sandbox.start(Microsandbox.home, name, detached ? true : false, Validate.json!(again))
        end
        scoped(new(native, shell: shell), &block)
      end

      # A handle on an existing sandbox, running or stopped — also one created by another
      # process: its record (status, timestamps, labels, create options) and control
      # ({SandboxHandle#stop}, {SandboxHandle#kill}, `request_*`, `wait_until_stopped`).
      # It does not own the sandbox: dropping it or exiting leaves the VM alone. Commands
      # run through {SandboxHandle#sandbox} (or the calls it forwards, e.g. `#exec`).
      # @param name [String, Symbol] (`to_s`)
      # @param shell [String, nil] overrides the `shell:` given at create for this handle
      # @return [SandboxHandle]
      # @raise [SandboxNotFoundError]
      def get(name, shell: nil)
        shell = Validate.guest_path!("shell", shell) if shell
        record = JSON.parse(Native::Sandbox.record_json(Microsandbox.home, Validate.name!(name)))
        SandboxHandle.new(record, shell: shell)
      end

      # Every sandbox known in {Microsandbox.home}, running or stopped.
      # @return [Array<SandboxHandle>]
      def list
        JSON.parse(Native::Sandbox.list_records_json(Microsandbox.home)).map { |h| SandboxHandle.new(h) }
      end

      # Sandboxes whose labels include all of `labels` (all sandboxes for `{}`). Keys and
      # values are coerced with `to_s`, as {create} stores them.
      # @param labels [Hash{String, Symbol=>Object}]
      # @return [Array<SandboxHandle>]
      def list_with(labels: {})
        want = Validate.env!("labels", Validate.coerce_values!("labels", labels)).to_h
        list.select { |info| want.all? { |k, v| info.labels[k] == v } }
      end

      # Deletes a stopped sandbox and its root disk.
      # @param name [String]
      # @return [nil]
      # @raise [SandboxNotFoundError, SandboxStillRunningError]
      def remove(name)
        name = Validate.name!(name)
        Instrumentation.instrument("remove.microsandbox", { name: name }) { Native::Sandbox.remove(Microsandbox.home, name) }
        nil
      end

      private

      # `from_snapshot:` (a snapshot name, digest or artifact path) or `image:`, exactly one.
      def snapshot_source!(image, from_snapshot)
        if from_snapshot.nil?
          raise ArgumentError, "missing keyword: :image (or from_snapshot:)" if image.nil?

          return nil
        end
        raise ArgumentError, "image: and from_snapshot: are exclusive: a snapshot brings its own root" unless image.nil?

        key = from_snapshot.respond_to?(:to_path) ? from_snapshot.to_path : from_snapshot
        key = Validate.string!("from_snapshot", key)
        key.start_with?("~", "./", "../") ? File.expand_path(key) : key
      end

      # `fstype:` belongs to disk-image roots (ArgumentError otherwise, as in the reference).
      def fstype_option!(image, fstype)
        return if fstype.nil?
        raise TypeError, "fstype must be a String or Symbol (got #{fstype.class})" unless fstype.is_a?(String) || fstype.is_a?(Symbol)
        return if disk_image?(image)

        raise ArgumentError, "fstype: applies to disk-image roots (.#{DISK_IMAGE_EXTENSIONS.join(', .')}) only"
      end

      # `init:` as the engine takes it: `{ "cmd" =>, "args" =>, "env" => [[k, v], ...] }`.
      def init_option(init)
        case init
        when String, Symbol then { "cmd" => init.to_s }
        when Hash
          opts = init.transform_keys(&:to_s)
          unknown = opts.keys - %w[cmd args env]
          raise ArgumentError, "init: unknown key(s) #{unknown.join(', ')}; use cmd:, args:, env:" unless unknown.empty?

          cmd = opts.fetch("cmd") { raise ArgumentError, "init: a Hash needs cmd:" }
          spec = { "cmd" => cmd.to_s }
          spec["args"] = Array(opts["args"]).map(&:to_s) unless opts["args"].nil?
          spec["env"] = Validate.env!("init env", Validate.coerce_values!("init env", opts["env"])) unless opts["env"].nil?
          spec
        else
          raise TypeError, "init must be a String, Symbol or Hash (got #{init.class})"
        end
      end

      # `security:` and `ephemeral:` as the engine takes them.
      def profile_options(security, ephemeral)
        opts = {}
        opts["ephemeral"] = true if ephemeral
        return opts if security.nil?

        unless security.is_a?(String) || security.is_a?(Symbol)
          raise TypeError, "security must be a String or Symbol (got #{security.class})"
        end
        profile = security.to_s
        unless SECURITY_PROFILES.include?(profile)
          raise InvalidConfigError, "security must be one of #{SECURITY_PROFILES.join(', ')} (got #{profile.inspect})"
        end

        opts["security"] = profile
        opts
      end

      # `rlimits:`, `log_level:`, `quiet_logs:` as the engine takes them.
      def run_options(rlimits, log_level, quiet_logs)
        opts = { "quiet_logs" => quiet_logs ? true : false }
        opts["rlimits"] = Validate.rlimits!("rlimits", rlimits).map { |r, soft, hard| { "resource" => r, "soft" => soft, "hard" => hard } }
        if log_level
          level = log_level.to_s
          raise InvalidConfigError, "log_level must be one of #{LOG_LEVELS.join(', ')} (got #{level.inspect})" unless LOG_LEVELS.include?(level)

          opts["log_level"] = level
        end
        opts
      end

      # The live handle {SandboxHandle#sandbox} connects.
      def connect(name, shell)
        new(Native::Sandbox.get(Microsandbox.home, Validate.name!(name)), shell: shell)
      end

      def scoped(sandbox)
        return sandbox unless block_given?

        begin
          yield sandbox
        ensure
          sandbox.__send__(:release)
        end
      end

      # A local path ending in one of {DISK_IMAGE_EXTENSIONS} (any case).
      def disk_image?(image)
        image.is_a?(String) && local_path?(image) &&
          DISK_IMAGE_EXTENSIONS.include?(File.extname(image).delete_prefix(".").downcase)
      end

      # Paths name local root directories; anything else is an image reference.
      def local_path?(image)
        image.start_with?("/", "./", "../", "~") || %w[. ..].include?(image)
      end

      def build_placement(labels, detached, replace, replace_with_timeout)
        timeout = Validate.timeout!("replace_with_timeout", replace_with_timeout)
        placement = {
          "labels" => Validate.env!("labels", labels).to_h,
          "detached" => detached ? true : false,
          "replace" => replace || !timeout.nil? ? true : false
        }
        placement["replace_timeout_ms"] = (timeout * 1000).ceil if timeout
        placement
      end

      def build_config(name, image, cpus, memory, env, workdir, accel, boot_timeout)
        config = {
          "name" => Validate.name!(name),
          "image" => local_path?(Validate.string!("image", image)) ? File.expand_path(image) : image,
          "cpus" => Validate.integer!("cpus", cpus),
          "memory_mib" => Validate.integer!("memory", memory),
          "env" => Validate.env!("env", env),
          "workdir" => Validate.optional_string!("workdir", workdir)
        }
        config["accel"] = accel.to_s if accel
        timeout = Validate.timeout!("boot_timeout", boot_timeout)
        config["boot_timeout_ms"] = (timeout * 1000).ceil if timeout
        home = Microsandbox.home
        config["home"] = home if home
        config
      end
    end

    # @api private
    def initialize(native, shell: nil)
      @native = native
      @shell = shell || native.shell
      @owner_pid = Process.pid
      @info = JSON.parse(native.info_json, symbolize_names: true).freeze
    end

    # @return [String] the sandbox name
    def name
      @native.name
    end

    # What runs this sandbox: `:vmm` ("qemu"), `:accel` ("kvm", "hvf" or "tcg"),
    # `:vmm_pid`, `:supervisor_pid`, `:kernel` (guest kernel release), `:boot_ms` (start
    # of the supervisor to a ready agent), `:start` ("booted", or "restored" from a
    # template, see {Templates}) and `:template` (the template's id, or nil). A booted
    # sandbox also has `:boot_phases`: where its boot went, as `[step, microseconds]`
    # pairs in order (`"engine.*"`: since `create` began; `"supervisor.*"`: since the
    # supervisor started; `"guest.*"`: the guest agent's steps in guest uptime), for
    # diagnosing slow boots (bench/boot_exec.rb prints them); absent after a restore.
    # @return [Hash{Symbol => Object}]
    attr_reader :info

    # @return [Boolean] false once stopped or killed, or when its VM or supervisor is gone
    #   (however it died; checked on each call)
    def running?
      @native.running?
    end

    # @return [Boolean]
    def stopped?
      !running?
    end

    # The live status: :running, :draining while a drain asked by any process
    # ({#drain}, {#request_drain}) lets the running commands finish, then once it ended
    # :stopped, :paused when {#pause} saved its VM (the next {#resume} or {Sandbox.start}
    # brings it back), or :crashed when the run ended on its own (see
    # {SandboxStopResult#status}). {#running?} is true for :running and :draining (the VM
    # runs).
    # @return [Symbol]
    def status
      return(@native.draining? ? :draining : :running) if running?

      SandboxHandle.status_of_ended_run(last_stop)
    end

    # How the last run ended (nil while it runs).
    # @return [SandboxStopResult, nil]
    def last_stop
      json = @native.last_stop_json
      json && SandboxStopResult.from_record(name, JSON.parse(json))
    end

    # @return [Hash{String=>String}] labels given at create
    def labels
      JSON.parse(@native.labels_json)
    end

    # @return [Boolean] true when this process started the VM and it dies with this process
    def owns_lifecycle?
      @native.owns_lifecycle?
    end

    # Lets the sandbox outlive this process. It keeps running until someone stops it
    # (e.g. another process via {Sandbox.get}).
    # @return [nil]
    def detach
      @native.detach
      nil
    end

    # Removes this sandbox (it must be stopped).
    # @return [nil]
    def remove
      self.class.remove(name)
    end

    # Runs a program (no shell) and waits for it. A non-zero exit is not an error.
    #
    # The calling thread blocks without holding the GVL; `Thread#kill`, `Timeout.timeout`
    # and Ctrl-C interrupt the call and kill the command.
    #
    # @param cmd [String, #to_s] program name (looked up in the guest PATH) or path;
    #   `to_s` is taken, as the reference gem does (a Symbol or Pathname works)
    # @param args [Array<#to_s>, #to_s] arguments, each `to_s` (`Array(args)`: nil is none)
    # @param cwd [String, nil] working directory (default: the sandbox workdir, else "/")
    # @param env [Hash{#to_s=>#to_s}, nil] added to the sandbox environment (keys and
    #   values `to_s`, so `{ N: 1 }` sets N=1)
    # @param stdin [String, :null, nil] bytes fed to the command's stdin (closed
    #   afterwards); nil or `:null`: an empty stdin. A command that takes only part of
    #   them (`head -c1`) or none never makes this wait: it returns when the command ends,
    #   with {ExecOutput#stdin_error} saying how many bytes did not reach it
    # @param timeout [Numeric, nil] seconds before the command is killed (nil: no limit;
    #   0: a deadline already passed, so {ExecTimeoutError} without running the command)
    # @param user [String, nil] guest user: "name", "uid", "name:group" or "uid:gid"
    #   (default: the sandbox's `user:`, else root)
    # @param rlimits [Hash{Symbol=>Integer, Array(Integer, Integer)}, nil] resource limits,
    #   e.g. `{ nofile: 256, nproc: [64, 128] }` (a single value sets soft and hard)
    # @param tty [Boolean] run on a pseudo-terminal: stdout and stderr arrive merged (with
    #   CRLF line ends) in `stdout`, and stdin ends with the terminal's EOF character;
    #   `TERM` defaults to "xterm"
    # @param rows [Integer, nil] terminal height with `tty: true` (1..65535, default 24)
    # @param cols [Integer, nil] terminal width with `tty: true` (1..65535, default 80)
    # @return [ExecOutput]
    # @raise [ExecFailedError] the command could not be started (e.g. not found)
    # @raise [ExecTimeoutError] the command ran past `timeout` (or `timeout` is 0)
    # @raise [SandboxNotRunningError] the sandbox is stopped or its VM died
    # @raise [InvalidConfigError] `rows:`/`cols:` out of range or given without `tty: true`
    # @raise [ArgumentError] `timeout` is negative or NaN, or `stdin:` is another Symbol
    def exec(cmd, args = [], cwd: nil, env: nil, stdin: nil, timeout: nil, user: nil, rlimits: nil,
             tty: false, rows: nil, cols: nil)
      program, argv, pairs, cwd, seconds = exec_arguments(cmd, args, cwd, env, timeout)
      stdin = case stdin
              when nil, :null then nil
              when Symbol
                raise ArgumentError, "exec takes stdin: nil, :null or a String (:pipe needs exec_stream), " \
                                     "got #{stdin.inspect}"
              else Validate.string!("stdin", stdin).b
              end
      user = Validate.optional_utf8_string!("user", user)
      limits = Validate.rlimits!("rlimits", rlimits)
      size = Validate.tty!(tty, rows, cols)
      Instrumentation.instrument("exec.microsandbox", Instrumentation.exec_payload(name, program, argv, size, seconds)) do |payload|
        code, signal, out, err, stdin_error = @native.exec(program, argv, pairs, cwd, seconds, stdin, user, limits, size)
        ExecOutput.new(exit_code: code, signal: signal, stdout: out, stderr: err, stdin_error: stdin_error)
                  .tap { |o| payload&.store(:exit_code, o.exit_code) }
      end
    end

    # Starts a program and returns at once; its output arrives as it is produced.
    #
    # @example
    #   sb.exec_stream("sh", ["-c", "for i in 1 2 3; do echo $i; sleep 1; done"]).each do |ev|
    #     print ev.text if ev.stdout?
    #   end
    # @param cmd [String, #to_s] as for {#exec}
    # @param args [Array<#to_s>, #to_s] as for {#exec}
    # @param stdin [String, :pipe, :null, nil] bytes to feed (then closed); `:pipe` to
    #   write them through {ExecHandle#stdin} until you close it; `:null` for an empty
    #   stdin; nil (the default, the 0.5.7 README's form): writable through
    #   {ExecHandle#stdin} until the first output is read ({ExecHandle#each},
    #   `#collect`, `#wait`), which closes it — so `exec_stream("cat").collect` ends, and
    #   `h.stdin.write(...); h.stdin.close; h.collect` delivers. A write after that
    #   raises {StdinClosedError}; use `:pipe` to write while reading.
    # @param cwd [String, nil]
    # @param env [Hash{#to_s=>#to_s}, nil] as for {#exec}
    # @param timeout [Numeric, nil] seconds before the command is killed: unlike the
    #   reference gem, which ignores it here, the timeout is applied (the stream ends with
    #   {ExecTimeoutError}); 0 raises {ExecTimeoutError} at once, negative ArgumentError
    # @param tty [Boolean] run on a pseudo-terminal (the command's stdin, stdout, stderr and
    #   controlling terminal): all output arrives as stdout events, stdin stays open for
    #   {ExecHandle#stdin} (closing it types the EOF character), {ExecHandle#resize}
    #   changes the size; `TERM` defaults to "xterm"
    # @param rows [Integer, nil] initial terminal height with `tty: true` (default 24)
    # @param cols [Integer, nil] initial terminal width with `tty: true` (default 80)
    # A command that cannot be started (not found, not executable) yields a single
    # `:failed` event; its {ExecHandle#collect}/{ExecHandle#wait} raise {ExecFailedError}.
    # Stdin bytes the command does not take (it closes its stdin, or ends first) are
    # reported by a `:stdin_error` event, and writes after it raise {StdinBrokenError}.
    # @return [ExecHandle]
    # @raise [InvalidConfigError] `rows:`/`cols:` out of range or given without `tty: true`
    def exec_stream(cmd, args = [], cwd: nil, env: nil, stdin: nil, timeout: nil, user: nil, rlimits: nil,
                    tty: false, rows: nil, cols: nil)
      program, argv, pairs, cwd, seconds = exec_arguments(cmd, args, cwd, env, timeout)
      user = Validate.optional_utf8_string!("user", user)
      limits = Validate.rlimits!("rlimits", rlimits)
      size = Validate.tty!(tty, rows, cols)
      data = nil
      case stdin
      when nil then pipe = auto_close = size.nil? # a terminal's stdin is always open
      when :null then pipe = false
      when :pipe then pipe = true
      when Symbol
        raise ArgumentError, "exec_stream takes stdin: nil, :null, :pipe or a String, got #{stdin.inspect}"
      else
        pipe = false
        data = Validate.string!("stdin", stdin).b
      end
      native = Instrumentation.instrument("exec_stream.microsandbox", Instrumentation.exec_payload(name, program, argv, size, seconds)) do
        @native.exec_stream(program, argv, pairs, cwd, seconds, data, pipe, user, limits, size)
      end
      ExecHandle.new(native, tty: !size.nil?, auto_close_stdin: auto_close || false)
    end

    # {#exec_stream} of a shell script (`sh -c script`).
    # @param script [String]
    # @return [ExecHandle]
    def shell_stream(script, **options)
      exec_stream(@shell, ["-c", Validate.string!("script", script)], **options)
    end

    # Runs a shell script with the sandbox shell (`sh -c script`).
    # Takes the same keyword options as {#exec}.
    # @param script [String]
    # @return [ExecOutput]
    def shell(script, **options)
      exec(@shell, ["-c", Validate.string!("script", script)], **options)
    end

    # The guest filesystem: read, write, list, stat, copy files to and from the host.
    # @return [FS]
    def fs
      @fs ||= FS.new(@native)
    end

    # Shuts the guest down cleanly, killing it after `timeout` seconds.
    # Does nothing if the sandbox is already stopped, or in a forked child process
    # (the VM belongs to the process that created it).
    # @param timeout [Numeric] seconds to wait for a clean shutdown
    # @return [nil]
    def stop(timeout: DEFAULT_STOP_TIMEOUT)
      seconds = Validate.timeout!("timeout", timeout)
      return nil unless owner?

      Instrumentation.instrument("stop.microsandbox", { name: name, timeout: seconds }) { @native.stop(seconds) }
      nil
    end

    # Kills the VM at once. Does nothing in a forked child process.
    # @return [nil]
    def kill
      return nil unless owner?

      Instrumentation.instrument("kill.microsandbox", { name: name }) { @native.kill }
      nil
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{name.inspect} #{running? ? 'running' : 'stopped'} " \
        "vmm=#{@info[:vmm]} accel=#{@info[:accel]}>"
    end

    private

    def exec_arguments(cmd, args, cwd, env, timeout)
      program, argv = Validate.argv!(cmd, args)
      seconds = exec_timeout!(timeout)
      pairs = Validate.exec_env!("env", env)
      cwd = Validate.optional_utf8_string!("cwd", cwd)
      # As in the reference gem, 0 is a deadline already passed: the command is not started.
      raise ExecTimeoutError, "#{program} was not run: timeout: 0 is a deadline that has already passed" if seconds&.zero?

      [program, argv, pairs, cwd, seconds]
    end

    # The reference gem's exec timeout contract: nil (or infinity) means none, 0 an
    # immediate deadline, negative or NaN is an ArgumentError.
    def exec_timeout!(timeout)
      return nil if timeout.nil?
      raise TypeError, "timeout must be a Numeric number of seconds (got #{timeout.class})" unless timeout.is_a?(Numeric)

      seconds = timeout.to_f
      raise ArgumentError, "timeout must be zero or a positive number of seconds (got #{timeout})" if seconds.nan? || seconds.negative?

      seconds.infinite? ? nil : seconds
    end

    def owner?
      Process.pid == @owner_pid
    end

    # Block-form cleanup: stop, and kill if stopping itself fails. As in the reference gem,
    # a `detached:` sandbox is stopped too: the block form scopes the sandbox's life.
    def release
      return unless owner? && running?

      begin
        stop
      rescue StandardError
        kill
      end
    end
  end
end
