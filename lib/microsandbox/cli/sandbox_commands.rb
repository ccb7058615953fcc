# frozen_string_literal: true

require "securerandom"

module Microsandbox
  class CLI
    # `run`, `exec`, `shell`, `ls`/`ps`, `inspect`, `logs`, `start`, `stop`, `kill`, `rm`.
    module SandboxCommands
      private

      def cmd_run(argv)
        o = { env: {}, labels: {}, ports: {}, ports_udp: {}, volumes: {} }
        parser("run [OPTIONS] IMAGE [--] [COMMAND [ARG...]]   (or: run --from-snapshot SNAP [OPTIONS] [--] [COMMAND…])") do |p|
          p.separator "IMAGE is an OCI reference or a local root directory (starting with / or .)."
          p.separator "Without -d the sandbox is stopped when COMMAND ends (removed with --rm), and"
          p.separator "the exit status is COMMAND's. With -d it keeps running (detached) and COMMAND,"
          p.separator "if given, becomes its main process (output in `microsandbox logs`)."
          p.separator ""
          p.on("--name NAME", "sandbox name (default run-<8 hex>)") { |v| o[:name] = v }
          p.on("--rm", "remove the sandbox when the command ends") { o[:rm] = true }
          p.on("--from-snapshot SNAP", "boot from a snapshot (name, digest or path) instead of an IMAGE") { |v| o[:from_snapshot] = v }
          p.on("-d", "--detach", "leave the sandbox running; print its name") { o[:detach] = true }
          sandbox_options(p, o)
          exec_options(p, o)
          p.on("-l", "--label KEY=VAL", "label (repeatable)") { |v| add_pair(o[:labels], v, "--label") }
          p.on("-p", "--publish [ADDR:]HOST:GUEST[/udp]", "publish a guest port (on 127.0.0.1:HOST without ADDR)") { |v| add_port(o, v) }
          p.on("-v", "--volume SOURCE:/GUEST[:ro]", "mount a host path (/… or ./…) or a named volume") { |v| add_volume(o, v) }
          p.on("--tmpfs /GUEST[:SIZE_MIB]", "mount a tmpfs") { |v| add_tmpfs(o, v) }
          p.on("--network POLICY", "public_only (default), none, allow_all, non_local, or an alias") { |v| o[:network] = v }
          p.on("--memory MIB", Integer, "guest memory in MiB (default 512)") { |v| o[:memory] = v }
          p.on("--cpus N", Integer, "virtual CPUs (default 1)") { |v| o[:cpus] = v }
          p.on("--pull POLICY", "always, if_missing (default) or never") { |v| o[:pull_policy] = v }
          p.on("--insecure", "the registry speaks plain HTTP") { o[:registry_insecure] = true }
        end.order!(argv)
        image = o[:from_snapshot] ? nil : (argv.shift or raise UsageError, "run: missing IMAGE")
        argv.shift if argv.first == "--"
        raise UsageError, "run: --rm and -d exclude each other (a detached sandbox outlives the command)" if o[:rm] && o[:detach]
        raise UsageError, "run: give a COMMAND, or -d to leave the sandbox running" if argv.empty? && !o[:detach]

        name = o[:name] || "run-#{SecureRandom.hex(4)}"
        options = create_options(image, o)
        return run_detached(name, argv, options) if o[:detach]

        run_attached(name, argv, options, o)
      end

      def run_detached(name, argv, options)
        options[:entrypoint] = argv unless argv.empty?
        sb = Sandbox.create(name, detached: true, **options)
        @json ? emit_json(name: sb.name, status: "running", info: sb.info) : @out.puts(sb.name)
        EXIT_CODES[:ok]
      end

      # Creates the sandbox, runs the command, then stops it (kills and removes it with
      # --rm) whatever happened, also on Ctrl-C or SIGTERM: a sandbox this command made
      # must not outlive it. With --rm the sandbox is also `ephemeral:`, so it leaves no
      # record even when a signal lands after the VM booted but before `create` returned
      # (no handle to clean up with here): it dies with this process, and the engine
      # purges a stopped ephemeral sandbox.
      def run_attached(name, argv, options, o)
        options = options.merge(ephemeral: true) if o[:rm]
        sb = Sandbox.create(name, **options)
        run_command(sb, argv, o)
      ensure
        if sb
          begin
            o[:rm] ? sb.kill : sb.stop
          rescue Microsandbox::Error
            sb.kill
          end
          remove_quietly(sb.name) if o[:rm]
        end
      end

      # An ephemeral sandbox may be purged already once it has stopped.
      def remove_quietly(name)
        Sandbox.remove(name)
      rescue SandboxNotFoundError
        nil
      end

      def cmd_exec(argv)
        o = { env: {} }
        parser("exec [OPTIONS] NAME [--] COMMAND [ARG...]") do |p|
          p.separator "Runs COMMAND in the running sandbox NAME; exits with COMMAND's status."
          p.separator ""
          p.on("-e", "--env KEY[=VAL]", "environment (repeatable; KEY alone copies ours)") { |v| add_env(o[:env], v) }
          p.on("-w", "--workdir DIR", "working directory") { |v| o[:cwd] = v }
          p.on("-u", "--user USER", "guest user (name, uid, name:group)") { |v| o[:user] = v }
          exec_options(p, o)
        end.order!(argv)
        name = argv.shift or raise UsageError, "exec: missing NAME"
        argv.shift if argv.first == "--"
        raise UsageError, "exec: missing COMMAND" if argv.empty?

        sb = Sandbox.get(name).sandbox
        run_command(sb, argv, o, env: o[:env].empty? ? nil : o[:env], cwd: o[:cwd], user: o[:user])
      end

      def cmd_shell(argv)
        o = { env: {} }
        parser("shell [OPTIONS] NAME") do |p|
          p.separator "An interactive shell in the running sandbox NAME, on a terminal when stdin is"
          p.separator "one (raw mode, window size follows ours); otherwise it reads a script from stdin."
          p.separator ""
          p.on("--shell PATH", "guest shell (default: the sandbox's, /bin/sh)") { |v| o[:shell] = v }
          p.on("-e", "--env KEY[=VAL]", "environment (repeatable)") { |v| add_env(o[:env], v) }
          p.on("-w", "--workdir DIR", "working directory") { |v| o[:cwd] = v }
          p.on("-u", "--user USER", "guest user") { |v| o[:user] = v }
        end.order!(argv)
        expect_args!(argv, 1, 1, "shell")
        handle = Sandbox.get(argv[0])
        shell = o[:shell] || handle.config.fetch("shell", "/bin/sh")
        tty = @in.tty?
        env = o[:env].dup
        env["TERM"] ||= ENV["TERM"] if tty && ENV["TERM"]
        exec_opts = { env: env.empty? ? nil : env, cwd: o[:cwd], user: o[:user] }.compact
        status = Terminal.new(@in, @out, @err).attach(handle.sandbox, shell, [], interactive: true, tty: tty, **exec_opts)
        exit_status(status)
      end

      def cmd_ls(argv)
        all = true
        parser("ls [OPTIONS] [NAME...]") do |p|
          p.separator "Sandboxes in the home, running or stopped (NAMEs: only those)."
          p.separator ""
          p.on("--running", "only running ones") { all = false }
        end.parse!(argv)
        list = Sandbox.list.sort_by(&:created_at)
        list.select! { |h| argv.include?(h.name) } unless argv.empty?
        list.select!(&:running?) unless all
        if @json
          emit_json(list.map { |h| handle_summary(h) })
        else
          table(%w[NAME STATUS IMAGE CREATED],
                list.map { |h| [h.name, h.status.to_s, h.config["image"].to_s, local_time(h.created_at)] })
        end
        EXIT_CODES[:ok]
      end

      def cmd_inspect(argv)
        parser("inspect NAME...") { |p| p.separator "Records as a JSON array (running ones with their VM's details)." }
          .parse!(argv)
        expect_args!(argv, 1, nil, "inspect")
        docs = argv.map { |name| inspect_document(Sandbox.get(name)) }
        @out.puts JSON.pretty_generate(docs)
        EXIT_CODES[:ok]
      end

      def cmd_logs(argv)
        o = { sources: "output" }
        parser("logs [OPTIONS] NAME") do |p|
          p.separator "Output of the sandbox's commands and main process: stdout entries to stdout,"
          p.separator "stderr entries to stderr, system (console) lines to stderr prefixed [system]."
          p.separator ""
          p.on("-f", "--follow", "keep printing new entries until the sandbox stops") { o[:follow] = true }
          p.on("--tail N", Integer, "only the last N entries") { |v| o[:tail] = v }
          p.on("--source LIST", "stdout,stderr,system,output (default),all") { |v| o[:sources] = v }
        end.parse!(argv)
        expect_args!(argv, 1, 1, "logs")
        sb = Sandbox.get(argv[0]).sandbox
        sources = o[:sources].split(",").map(&:strip)
        @out.sync = true
        if o[:follow]
          # --tail N -f: the last N entries, then what comes after the last of them.
          start = {}
          if o[:tail]
            entries = sb.logs(tail: o[:tail], sources: sources)
            entries.each { |e| print_log_entry(e) }
            start = entries.empty? ? { since_ms: Time.now } : { from_cursor: entries.last.cursor }
          end
          sb.log_stream(sources: sources, follow: true, **start) { |e| print_log_entry(e) }
        else
          sb.logs(tail: o[:tail], sources: sources).each { |e| print_log_entry(e) }
        end
        EXIT_CODES[:ok]
      end

      def cmd_metrics(argv)
        o = { interval: 1.0 }
        parser("metrics [OPTIONS] NAME...") do |p|
          p.separator "CPU, memory, disk and uptime of running sandboxes, measured on the host."
          p.separator ""
          p.on("-f", "--follow", "a new sample every --interval seconds until the sandboxes stop") { o[:follow] = true }
          p.on("--interval SECONDS", Float, "seconds between samples with -f (default 1)") { |v| o[:interval] = v }
        end.parse!(argv)
        expect_args!(argv, 1, nil, "metrics")
        sandboxes = argv.map { |name| Sandbox.get(name).sandbox }
        @out.sync = true
        loop do
          started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
          samples = sandboxes.filter_map do |sb|
            [sb.name, sb.metrics]
          rescue SandboxNotRunningError
            raise unless o[:follow] # -f: a sandbox that stopped leaves the table

            nil
          end
          break if samples.empty?

          print_metrics(samples)
          break unless o[:follow]

          rest = o[:interval] - (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
          sleep rest if rest.positive?
        end
        EXIT_CODES[:ok]
      end

      def cmd_start(argv)
        parser("start NAME...") { |p| p.separator "Boots stopped sandboxes again, detached (same disk, same options)." }
          .parse!(argv)
        expect_args!(argv, 1, nil, "start")
        each_name(argv) { |name| Sandbox.start(name, detached: true) }
      end

      def cmd_stop(argv)
        timeout = Sandbox::DEFAULT_STOP_TIMEOUT
        parser("stop [OPTIONS] NAME...") do |p|
          p.on("-t", "--timeout SECONDS", Float, "kill after this long (default #{timeout})") { |v| timeout = v }
        end.parse!(argv)
        expect_args!(argv, 1, nil, "stop")
        each_name(argv) { |name| Sandbox.get(name).stop_with_timeout(timeout) }
      end

      def cmd_kill(argv)
        parser("kill NAME...").parse!(argv)
        expect_args!(argv, 1, nil, "kill")
        each_name(argv) { |name| Sandbox.get(name).kill }
      end

      def cmd_rm(argv)
        force = false
        parser("rm [OPTIONS] NAME...") do |p|
          p.on("-f", "--force", "kill a running sandbox first") { force = true }
        end.parse!(argv)
        expect_args!(argv, 1, nil, "rm")
        each_name(argv) do |name|
          handle = Sandbox.get(name)
          handle.kill if force && handle.running?
          Sandbox.remove(name)
        end
      end

      # -- helpers ---------------------------------------------------------------------

      def sandbox_options(p, o)
        p.on("-e", "--env KEY[=VAL]", "environment (repeatable; KEY alone copies ours)") { |v| add_env(o[:env], v) }
        p.on("-w", "--workdir DIR", "working directory (created if missing)") { |v| o[:workdir] = v }
        p.on("-u", "--user USER", "default guest user") { |v| o[:user] = v }
      end

      def exec_options(p, o)
        p.on("-i", "--interactive", "copy stdin to the command (else it reads EOF)") { o[:interactive] = true }
        p.on("-t", "--tty", "run on a terminal (raw mode, resize follows ours)") { o[:tty] = true }
        p.on("--timeout SECONDS", Float, "kill the command after this long (exit 124)") { |v| o[:timeout] = v }
      end

      def create_options(image, o)
        options = { image: image, from_snapshot: o[:from_snapshot], env: o[:env], labels: o[:labels], workdir: o[:workdir], user: o[:user],
                    network: o[:network], memory: o[:memory], cpus: o[:cpus], pull_policy: o[:pull_policy],
                    registry_insecure: o[:registry_insecure] }.compact
        accepted = Sandbox.method(:create).parameters.map(&:last)
        if options.key?(:from_snapshot) && !accepted.include?(:from_snapshot)
          raise UnsupportedError, "--from-snapshot needs snapshots, which this version does not have yet"
        end
        published = { ports: o[:ports], ports_udp: o[:ports_udp] }.reject { |_, v| v.empty? }
        unless published.empty?
          missing = published.keys - accepted
          unless missing.empty?
            raise UnsupportedError, "-p needs published ports (Sandbox.create #{missing.map { |k| "#{k}:" }.join(', ')}), " \
                                    "which this version does not have yet; reach guest services with `exec` instead"
          end
          options.merge!(published)
        end
        unless o[:volumes].empty?
          raise UnsupportedError, "-v/--tmpfs need volumes (Sandbox.create volumes:), which this version does not have yet" unless accepted.include?(:volumes)

          options[:volumes] = o[:volumes]
        end
        options
      end

      # Runs argv[0] with argv[1..] in `sb`: streamed to our stdout/stderr, or collected
      # into one JSON document with --json. Returns the command's exit status.
      def run_command(sb, argv, o, **exec_opts)
        exec_opts = exec_opts.compact
        exec_opts[:timeout] = o[:timeout] if o[:timeout]
        if @json
          stdin = o[:interactive] ? @in.binmode.read : nil
          tty = o[:tty] ? { tty: true } : {}
          out = sb.exec(argv[0], argv[1..], stdin: stdin, **tty, **exec_opts)
          emit_json({ "name" => sb.name, "exit_code" => out.exit_code, "signal" => out.signal }
                      .merge(bytes_fields("stdout", out.stdout_bytes), bytes_fields("stderr", out.stderr_bytes)))
          return exit_status(out.exit_code)
        end
        status = Terminal.new(@in, @out, @err)
                         .attach(sb, argv[0], argv[1..], interactive: o[:interactive] ? true : false,
                                                         tty: o[:tty] ? true : false, **exec_opts)
        exit_status(status)
      end

      # A guest status as ours: 0-255, else (unknown) the CLI's error status.
      def exit_status(code)
        code.is_a?(Integer) && code.between?(0, 255) ? code : EXIT_CODES[:error]
      end

      # Runs the block for each name; an error is reported (with the name) and the rest go
      # on. Prints each name done (JSON: the list). Returns the first failure's status.
      def each_name(names)
        failed = nil
        done = []
        names.each do |name|
          yield name
          done << name
          @out.puts name unless @json
        rescue Microsandbox::Error => e
          failed ||= fail_with(e.code, "#{name}: #{e.message}", :error)
        end
        emit_json(done) if @json
        failed || EXIT_CODES[:ok]
      end

      def add_pair(hash, text, flag)
        key, sep, value = text.partition("=")
        raise UsageError, "#{flag} takes KEY=VAL (got #{text.inspect})" if key.empty? || sep.empty?

        hash[key] = value
      end

      # `-e KEY=VAL`, or `-e KEY` to copy our own value (skipped when we have none), as docker.
      def add_env(hash, text)
        key, sep, value = text.partition("=")
        raise UsageError, "--env takes KEY=VAL or KEY (got #{text.inspect})" if key.empty?

        if sep.empty?
          hash[key] = ENV[key] if ENV.key?(key)
        else
          hash[key] = value
        end
      end

      # `-p [ADDR:]HOST:GUEST[/tcp|/udp]`, as docker: `8080:80`, `0.0.0.0:8080:80`,
      # `[::1]:8080:80/udp`. Without ADDR the host port is bound on 127.0.0.1.
      PUBLISH = %r{\A(?:(?<bind>\[[0-9A-Fa-f:.]+\]|[0-9.]+):)?(?<host>\d{1,5}):(?<guest>\d{1,5})(?:/(?<proto>tcp|udp))?\z}

      def add_port(o, text)
        m = PUBLISH.match(text)
        raise UsageError, "-p takes [ADDR:]HOST:GUEST[/tcp|/udp] with port numbers (got #{text.inspect})" unless m

        key = m[:bind] ? "#{m[:bind]}:#{m[:host]}" : Integer(m[:host], 10)
        o[m[:proto] == "udp" ? :ports_udp : :ports][key] = Integer(m[:guest], 10)
      end

      def handle_summary(handle)
        {
          "name" => handle.name, "status" => handle.status.to_s, "image" => handle.config["image"],
          "created_at" => iso_time(handle.created_at), "updated_at" => iso_time(handle.updated_at),
          "labels" => handle.labels, "detached" => handle.detached?
        }
      end

      def inspect_document(handle)
        doc = handle_summary(handle).merge("config" => handle.config)
        stop = handle.last_stop
        if stop
          doc["last_stop"] = { "status" => stop.status.to_s, "source" => stop.source, "exit_code" => stop.exit_code,
                               "signal" => stop.signal, "observed_at" => iso_time(stop.observed_at) }
        end
        if handle.running?
          begin
            doc["vm"] = handle.sandbox.info
          rescue Microsandbox::Error
            nil # it stopped meanwhile: the record says what is known
          end
        end
        doc
      end

      def print_metrics(samples)
        if @json
          samples.each do |name, m|
            emit_json({ "name" => name }.merge(m.to_h.transform_keys(&:to_s)).merge("timestamp" => iso_time(m.timestamp)))
          end
        else
          table(%w[NAME CPU MEMORY DISK-READ DISK-WRITE UPTIME],
                samples.map do |name, m|
                  [name, format("%.1f%%", m.cpu_percent), human_bytes(m.memory_bytes), human_bytes(m.disk_read_bytes),
                   human_bytes(m.disk_write_bytes), format("%ds", m.uptime_secs)]
                end)
        end
      end

      def print_log_entry(entry)
        if @json
          doc = { "source" => entry.source.to_s, "timestamp" => entry.timestamp && (entry.timestamp.to_r * 1000).to_i,
                  "session_id" => entry.session_id, "cursor" => entry.cursor }
          emit_json(doc.merge(bytes_fields("text", entry.data)))
        elsif entry.source.to_s == "stdout" then @out.write(entry.data)
        elsif entry.source.to_s == "stderr" then @err.write(entry.data)
        else
          @err.puts "[system] #{entry.text.chomp}"
        end
      end
    end
  end
end
