# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"
require "fileutils"
require "tmpdir"

module Microsandbox
  # A preflight check of this host: can it boot sandboxes, and how fast. See
  # {Microsandbox.doctor}. Reads files and runs `--version`/`df`; unless asked to
  # (`boot: true`) it never boots a VM, installs or changes anything.
  class Doctor
    # How much slower guest code runs under software emulation (QEMU TCG) than under KVM
    # or HVF: a typical figure for CPU-bound code, stated so a CI log explains slow specs.
    SOFTWARE_SLOWDOWN = 10

    # Free space under the home below which a sandbox cannot be created (its root disk
    # and copy-on-write layer) / below which the report warns.
    DISK_ERROR_BYTES = 256 * 1024 * 1024
    DISK_WARN_BYTES = 2 * 1024 * 1024 * 1024

    # Host programs the engine runs, and the Debian package of each.
    TOOLS = {
      "mke2fs" => "e2fsprogs", "debugfs" => "e2fsprogs", "resize2fs" => "e2fsprogs",
      "dumpe2fs" => "e2fsprogs", "qemu-img" => "qemu-utils"
    }.freeze

    # One finding.
    # @!attribute [r] name   [String] e.g. "accelerator", "qemu"
    # @!attribute [r] status [Symbol] :ok, :warn (works, with a caveat) or :error (no sandbox can boot)
    # @!attribute [r] summary [String] one line: what was found
    # @!attribute [r] fix    [String, nil] what to do about it
    Check = Struct.new(:name, :status, :summary, :fix, keyword_init: true) do
      # @return [Hash{String=>Object}]
      def to_h
        { "name" => name, "status" => status.to_s, "summary" => summary, "fix" => fix }
      end
    end

    # What {Microsandbox.doctor} found.
    class Report
      # @return [Array<Check>]
      attr_reader :checks
      # @return [String] the accelerator new sandboxes will use: "kvm", "hvf" or "tcg"
      attr_reader :accel

      # @api private
      def initialize(checks, accel)
        @checks = checks.freeze
        @accel = accel
      end

      # @return [Boolean] false when a check failed so that no sandbox can boot
      def ok?
        @checks.none? { |c| c.status == :error }
      end
      alias can_boot? ok?

      # @return [Boolean] true when guest code runs under software emulation
      def software_emulation?
        @accel == "tcg"
      end

      # @param name [String]
      # @return [Check, nil]
      def [](name)
        @checks.find { |c| c.name == name }
      end

      # @return [Array<Check>] the :error checks
      def errors = @checks.select { |c| c.status == :error }
      # @return [Array<Check>] the :warn checks
      def warnings = @checks.select { |c| c.status == :warn }

      # @return [Hash{String=>Object}]
      def to_h
        { "ok" => ok?, "accel" => @accel, "checks" => @checks.map(&:to_h) }
      end

      # The report for a terminal: one line per check, fixes indented under it.
      # @return [String]
      def to_s
        lines = @checks.map do |c|
          mark = { ok: "ok  ", warn: "warn", error: "FAIL" }.fetch(c.status)
          ["[#{mark}] #{c.name}: #{c.summary}", c.fix && "       -> #{c.fix}"].compact
        end.flatten
        lines << (ok? ? "This host can run sandboxes (#{@accel})." : "No sandbox can boot on this host until the FAIL lines are fixed.")
        "#{lines.join("\n")}\n"
      end

      # @return [String]
      def inspect
        "#<#{self.class.name} ok=#{ok?} accel=#{@accel} errors=#{errors.map(&:name)}>"
      end
    end

    # Why KVM can or cannot be used, as the engine decides it
    # (crates/microsandbox/src/vmm/accel.rs): the device must open read-write and, on
    # x86, the CPU must advertise VMX or SVM. Paths are parameters so each case is testable.
    # @param device [String]
    # @param cpuinfo [String]
    # @return [Array(Symbol, String)] [:usable | :missing_device | :permission | :no_virtualization, explanation]
    def self.kvm_status(device: "/dev/kvm", cpuinfo: "/proc/cpuinfo")
      begin
        File.open(device, "r+") { nil }
      rescue Errno::ENOENT, Errno::ENXIO, Errno::ENODEV
        return [:missing_device, "#{device} does not exist (no KVM module loaded, or virtualization is off " \
                                 "in the firmware; inside a VM, nested virtualization is off)"]
      rescue Errno::EACCES, Errno::EPERM
        return [:permission, "#{device} exists but this user cannot open it read-write"]
      rescue SystemCallError => e
        return [:missing_device, "#{device} cannot be opened (#{e.message})"]
      end
      return [:usable, "#{device} is usable"] unless RbConfig::CONFIG["host_cpu"].match?(/x86_64|i[3-6]86|amd64/)

      flags = begin
        File.foreach(cpuinfo).select { |l| l.start_with?("flags") }.flat_map(&:split)
      rescue SystemCallError
        []
      end
      return [:usable, "#{device} is usable and the CPU has #{(flags & %w[vmx svm]).first}"] if flags.intersect?(%w[vmx svm])

      [:no_virtualization, "#{device} opens but the CPU advertises no VMX/SVM: this host (typically a VM without " \
                           "nested virtualization, or a sandboxed CI runner) offers a KVM device that cannot run a " \
                           "Linux guest, so it is not used"]
    end

    # Static busybox (Debian's busybox-static) the boot check builds its root from.
    BUSYBOX = "/bin/busybox"

    # @param home [String]
    # @param boot [Boolean] also boot a throwaway sandbox (see {Microsandbox.doctor})
    def initialize(home: Microsandbox.home, boot: false)
      @home = home
      @boot = boot
    end

    # @return [Report]
    def run
      accel, accel_check = accelerator
      checks = [accel_check, qemu, runtime, gem_binaries, *tools, disk_space, virtiofsd].compact
      checks << boot_check(accel) if @boot && checks.none? { |c| c.status == :error }
      Report.new(checks, accel)
    end

    private

    def accelerator
      requested = ENV.fetch("MICROSANDBOX_ACCEL", "").strip
      requested = "auto" if requested.empty?
      return hvf_accelerator(requested) if RbConfig::CONFIG["host_os"].include?("darwin")

      state, why = self.class.kvm_status
      case requested
      when "tcg"
        ["tcg", Check.new(name: "accelerator", status: :warn, summary: "MICROSANDBOX_ACCEL=tcg: software emulation, " \
                                                                        "about #{SOFTWARE_SLOWDOWN}x slower than KVM (KVM: #{why})",
                                                             fix: "unset MICROSANDBOX_ACCEL to use KVM when it is usable")]
      when "hvf"
        ["hvf", Check.new(name: "accelerator", status: :error, summary: "MICROSANDBOX_ACCEL=hvf, but HVF exists only on macOS",
                                                              fix: "unset MICROSANDBOX_ACCEL")]
      when "kvm", "auto"
        return ["kvm", Check.new(name: "accelerator", status: :ok, summary: "KVM: #{why}")] if state == :usable

        kvm_fallback(requested, state, why)
      else
        ["tcg", Check.new(name: "accelerator", status: :error, summary: "MICROSANDBOX_ACCEL=#{requested.inspect} is not an accelerator",
                                                              fix: "use auto, kvm, hvf or tcg")]
      end
    end

    def kvm_fallback(requested, state, why)
      fix = {
        missing_device: "load the module (modprobe kvm_intel or kvm_amd), enable VT-x/AMD-V in the firmware, or " \
                        "enable nested virtualization for this VM",
        permission: "add this user to the kvm group (sudo usermod -aG kvm $USER, then log in again)",
        no_virtualization: "run on a host (or a VM with nested virtualization) whose CPU flags show vmx or svm"
      }.fetch(state)
      if requested == "kvm"
        ["kvm", Check.new(name: "accelerator", status: :error, summary: "MICROSANDBOX_ACCEL=kvm but #{why}", fix: fix)]
      else
        ["tcg", Check.new(name: "accelerator", status: :warn,
                          summary: "no KVM (#{why}); will use software emulation (TCG), about #{SOFTWARE_SLOWDOWN}x slower",
                          fix: fix)]
      end
    end

    def hvf_accelerator(requested)
      supported = capture("sysctl", "-n", "kern.hv_support")&.strip == "1"
      if requested == "tcg" || !supported
        why = supported ? "MICROSANDBOX_ACCEL=tcg" : "this Mac does not support the Hypervisor framework"
        return ["tcg", Check.new(name: "accelerator", status: :warn,
                                 summary: "#{why}: software emulation, about #{SOFTWARE_SLOWDOWN}x slower")]
      end
      ["hvf", Check.new(name: "accelerator", status: :ok, summary: "HVF (Hypervisor.framework) is supported")]
    end

    def qemu
      configured = ENV.fetch("MICROSANDBOX_QEMU", "")
      binary = configured.empty? ? which("qemu-system-#{RbConfig::CONFIG['host_cpu'].sub(/\Aamd64\z/, 'x86_64')}") : configured
      unless binary && File.executable?(binary)
        what = configured.empty? ? "qemu-system-#{RbConfig::CONFIG['host_cpu']} is not on PATH" : "MICROSANDBOX_QEMU=#{configured} is not executable"
        return Check.new(name: "qemu", status: :error, summary: what,
                         fix: "install Debian's qemu-system-x86 package (or set MICROSANDBOX_QEMU)")
      end
      version = capture(binary, "--version").to_s[/version (\S+)/, 1]
      return Check.new(name: "qemu", status: :error, summary: "#{binary} --version failed", fix: "reinstall QEMU") unless version

      Check.new(name: "qemu", status: :ok, summary: "#{binary} #{version}")
    end

    def runtime
      manifest = begin
        JSON.parse(File.read(File.join(@home, "runtime", "manifest.json")))
      rescue SystemCallError, JSON::ParserError
        nil
      end
      if manifest
        current = Microsandbox.installed?
        return Check.new(name: "guest kernel", status: current ? :ok : :warn,
                         summary: "#{manifest['kernel_release']} in #{@home}/runtime" \
                                  "#{current ? '' : ' (built from other binaries: reinstalled on the next create)'}")
      end
      source = ENV.fetch("MICROSANDBOX_KERNEL_DEB", "")
      installable = !source.empty? ? File.file?(source) : !which("apt-get").nil?
      if Microsandbox.auto_install_disabled?
        Check.new(name: "guest kernel", status: :error, summary: "not installed in #{@home} and MICROSANDBOX_NO_AUTO_INSTALL is set",
                  fix: "run Microsandbox.install (or unset MICROSANDBOX_NO_AUTO_INSTALL)")
      elsif installable
        Check.new(name: "guest kernel", status: :warn, summary: "not installed yet: the first create installs it into #{@home}",
                  fix: "run Microsandbox.install ahead of time to skip that wait")
      else
        Check.new(name: "guest kernel", status: :error, summary: "not installed, and neither apt-get nor MICROSANDBOX_KERNEL_DEB can provide it",
                  fix: "download a linux-image-*-cloud-amd64 .deb and set MICROSANDBOX_KERNEL_DEB to it")
      end
    end

    def gem_binaries
      missing = %w[msb-agent msb-supervisor].reject { |b| File.file?(Microsandbox.libexec(b)) }
      return Check.new(name: "gem binaries", status: :ok, summary: "guest agent and supervisor built") if missing.empty?

      Check.new(name: "gem binaries", status: :error, summary: "#{missing.join(' and ')} missing next to the extension",
                fix: "build the gem (bundle exec rake compile)")
    end

    def tools
      missing = TOOLS.keys.reject { |t| which(t) }
      return [Check.new(name: "disk tools", status: :ok, summary: TOOLS.keys.join(", "))] if missing.empty?

      [Check.new(name: "disk tools", status: :error, summary: "missing: #{missing.join(', ')}",
                 fix: "install Debian's #{missing.map { |t| TOOLS[t] }.uniq.join(' and ')}")]
    end

    def disk_space
      dir = @home
      dir = File.dirname(dir) until File.directory?(dir) || dir == File.dirname(dir)
      line = capture("df", "-Pk", dir).to_s.lines[1]
      free = line && Integer(line.split[3], 10) * 1024
      return Check.new(name: "disk space", status: :warn, summary: "could not read the free space of #{dir}") unless free

      status = if free < DISK_ERROR_BYTES then :error
               elsif free < DISK_WARN_BYTES then :warn
               else :ok
               end
      Check.new(name: "disk space", status: status, summary: format("%.1f GiB free under %s", free / 1024.0**3, dir),
                fix: status == :ok ? nil : "free space there, or point MICROSANDBOX_HOME elsewhere")
    rescue ArgumentError
      Check.new(name: "disk space", status: :warn, summary: "could not read the free space of #{dir}")
    end

    # virtiofsd matters only to a gem that has volumes: shared directories (bind mounts,
    # dir volumes) each run one. The engine takes `$MICROSANDBOX_VIRTIOFSD`, else the one
    # built with the gem.
    def virtiofsd
      return nil unless Microsandbox.const_defined?(:Volume, false)

      configured = ENV.fetch("MICROSANDBOX_VIRTIOFSD", "")
      path = configured.empty? ? Microsandbox.libexec("virtiofsd") : configured
      return Check.new(name: "virtiofsd", status: :ok, summary: path) if File.file?(path) && File.executable?(path)

      Check.new(name: "virtiofsd", status: :warn,
                summary: "#{path} is missing: sandboxes that share a host directory (bind mounts, dir volumes) cannot start",
                fix: "build the gem (bundle exec rake compile builds virtiofsd) or set MICROSANDBOX_VIRTIOFSD")
    end

    # Boots a sandbox from a two-file root (static busybox + sh), runs one command, and
    # removes it: what the other checks predict, shown. Installs the runtime if needed.
    def boot_check(accel)
      busybox = File.file?(BUSYBOX) && File.executable?(BUSYBOX) && File.read(BUSYBOX, 4, mode: "rb") == "\x7FELF".b
      unless busybox
        return Check.new(name: "boot", status: :warn, summary: "not tried: #{BUSYBOX} (a static busybox) is missing",
                         fix: "install Debian's busybox-static package")
      end

      Dir.mktmpdir("msb-doctor-root") do |root|
        FileUtils.mkdir_p(File.join(root, "bin"))
        FileUtils.cp(BUSYBOX, File.join(root, "bin", "busybox"))
        File.symlink("busybox", File.join(root, "bin", "sh"))
        name = "doctor-#{Process.pid}-#{Random.rand(1 << 32).to_s(16)}"
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        begin
          sandbox = Sandbox.create(name, image: root, network: "none", memory: 256, boot_timeout: 300)
          out = sandbox.exec("/bin/busybox", ["uname", "-r"], timeout: 60)
          took = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
          raise BootFailedError, "the test command exited with #{out.exit_code}" unless out.success?

          Check.new(name: "boot", status: :ok,
                    summary: format("a sandbox booted and ran a command in %.1f s (%s, kernel %s)", took, accel, out.stdout.strip))
        rescue Microsandbox::Error => e
          Check.new(name: "boot", status: :error, summary: "a test sandbox failed: #{e.code}: #{e.message}",
                    fix: "see the other checks; the message names what failed")
        ensure
          begin
            sandbox&.kill
            Sandbox.remove(name)
          rescue Microsandbox::Error
            nil # never created
          end
        end
      end
    end

    def which(program)
      ENV.fetch("PATH", "").split(File::PATH_SEPARATOR).each do |dir|
        path = File.join(dir, program)
        return path if File.file?(path) && File.executable?(path)
      end
      nil
    end

    # stdout of a short host command, nil when it cannot run or fails.
    def capture(*cmd)
      out, status = Open3.capture2(*cmd, err: File::NULL)
      status.success? ? out : nil
    rescue SystemCallError
      nil
    end
  end

  class << self
    # Checks what this host needs to run sandboxes and says what to do about what is
    # missing: the accelerator (KVM usable or why not — no device, no permission, a CPU
    # without VMX/SVM as in a VM without nested virtualization; HVF on macOS), QEMU and its
    # version, the guest kernel in the home, the gem's binaries, the disk tools, free
    # space under the home, and virtiofsd once volumes exist. Without KVM the report says
    # sandboxes will run under software emulation (slower) rather than failing.
    #
    # With `boot: true` it also boots a throwaway sandbox (a root of Debian's static
    # busybox, no network), runs one command and removes it, reporting how long that took;
    # this installs the runtime first if it is missing.
    # @param boot [Boolean]
    # @return [Doctor::Report] `ok?` is false only when no sandbox can boot
    def doctor(boot: false)
      Doctor.new(home: home, boot: boot).run
    end
  end
end
