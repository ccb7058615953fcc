# frozen_string_literal: true

require "optparse"
require "json"
require_relative "../microsandbox"
require_relative "cli/output"
require_relative "cli/terminal"
require_relative "cli/progress"
require_relative "cli/sandbox_commands"
require_relative "cli/image_commands"
require_relative "cli/volume_commands"
require_relative "cli/snapshot_commands"
require_relative "cli/doctor_command"

module Microsandbox
  # The `microsandbox` command line (`exe/microsandbox`). Standard library only
  # (OptionParser). Each command is a method of one of the command modules; this class
  # parses the global options, dispatches, and turns every failure into a message on
  # stderr carrying the error's stable code plus a documented exit status ({EXIT_CODES}).
  #
  # Commands that run something in a sandbox (`run`, `exec`, `shell`) exit with the
  # command's own status, so `microsandbox exec box -- false; echo $?` prints 1.
  #
  # @example
  #   exit Microsandbox::CLI.new.run(%w[ls --json])
  class CLI
    include Output
    include SandboxCommands
    include ImageCommands
    include VolumeCommands
    include SnapshotCommands
    include DoctorCommand

    # Exit statuses of the CLI itself. A command run in a sandbox passes its own status
    # through instead (0-255; 128+N when a signal N killed it).
    EXIT_CODES = {
      ok: 0,
      failure: 1,         # `doctor`: this host cannot boot a sandbox; an unexpected host error
      usage: 2,           # bad command line (unknown option, missing argument)
      timeout: 124,       # the command ran past --timeout (exec-timeout), as timeout(1)
      error: 125,         # any other Microsandbox::Error (code printed on stderr)
      cannot_run: 126,    # the command could not be started (exec-failed)
      not_found: 127,     # the command does not exist in the guest
      interrupted: 130    # Ctrl-C (SIGINT)
    }.freeze

    # Wrong command line: exit status 2.
    class UsageError < StandardError; end

    # @api private
    # Raised inside a command to end it with a given status after output was written.
    class Exit < StandardError
      attr_reader :status

      def initialize(status)
        super("exit #{status}")
        @status = status
      end
    end

    # `name => [summary, method]` in the order `help` lists them.
    COMMANDS = {
      "run" => ["create a sandbox, run a command in it, pass its exit status through", :cmd_run],
      "exec" => ["run a command in a running sandbox", :cmd_exec],
      "shell" => ["an interactive shell in a running sandbox (on a terminal)", :cmd_shell],
      "ls" => ["list sandboxes (also: ps)", :cmd_ls],
      "ps" => ["list sandboxes (also: ls)", :cmd_ls],
      "inspect" => ["a sandbox's record as JSON", :cmd_inspect],
      "logs" => ["a sandbox's output log (-f follows)", :cmd_logs],
      "metrics" => ["CPU, memory, disk of running sandboxes (-f follows)", :cmd_metrics],
      "start" => ["boot a stopped sandbox again (detached)", :cmd_start],
      "stop" => ["stop sandboxes cleanly", :cmd_stop],
      "kill" => ["kill sandboxes at once", :cmd_kill],
      "rm" => ["remove stopped sandboxes (-f: kill first)", :cmd_rm],
      "pull" => ["pull an image, with a progress bar per layer", :cmd_pull],
      "image" => ["images: ls | inspect REF | rm REF... | prune", :cmd_image],
      "volume" => ["named volumes: create NAME | ls | inspect NAME | rm NAME...", :cmd_volume],
      "snapshot" => ["snapshots: create SANDBOX | ls | inspect | rm | verify | export | import", :cmd_snapshot],
      "doctor" => ["check this host can run sandboxes, and how fast", :cmd_doctor],
      "version" => ["print the gem and runtime versions", :cmd_version],
      "help" => ["help for a command", :cmd_help]
    }.freeze

    # @param stdin [IO] @param stdout [IO] @param stderr [IO]
    def initialize(stdin: $stdin, stdout: $stdout, stderr: $stderr)
      @in = stdin
      @out = stdout
      @err = stderr
      @json = false
    end

    # Runs one command line.
    # @param argv [Array<String>]
    # @return [Integer] the exit status (see {EXIT_CODES})
    def run(argv)
      argv = argv.dup
      global_parser.order!(argv)
      name = argv.shift
      return usage_summary(EXIT_CODES[:usage]) if name.nil?

      entry = COMMANDS[name] or raise UsageError, "unknown command #{name.inspect}"
      status = __send__(entry[1], argv)
      status.is_a?(Integer) ? status : EXIT_CODES[:ok]
    rescue Exit => e
      e.status
    rescue UsageError, OptionParser::ParseError => e
      fail_with("usage", "#{e.message} (see `microsandbox help#{" #{name}" if COMMANDS.key?(name.to_s)}`)", :usage)
    rescue ExecTimeoutError => e
      fail_with(e.code, e.message, :timeout)
    rescue StdinClosedError => e
      fail_with(e.code, e.message, :error)
    rescue ExecFailedError => e
      fail_with(e.code, e.message, e.message.include?("No such file or directory") ? :not_found : :cannot_run)
    rescue Microsandbox::Error => e
      fail_with(e.code, e.message, :error)
    rescue ArgumentError, TypeError => e
      fail_with("invalid-argument", e.message, :usage)
    rescue Interrupt
      @err.puts
      EXIT_CODES[:interrupted]
    rescue Errno::EPIPE
      # Our stdout was closed (`| head`): stop quietly, as cat(1) does.
      EXIT_CODES[:failure]
    rescue SystemCallError, IOError => e
      fail_with("io-error", e.message, :failure)
    rescue StandardError => e
      # A bug of the CLI: say so in one line (the backtrace with MICROSANDBOX_DEBUG=1).
      @err.puts e.full_message unless ENV.fetch("MICROSANDBOX_DEBUG", "").empty?
      fail_with("internal-error", "#{e.class}: #{e.message} (please report this)", :failure)
    end

    private

    def global_parser
      OptionParser.new do |o|
        o.banner = "usage: microsandbox [--json] [--home DIR] COMMAND [ARGS]"
        o.on("--json", "machine-readable output on stdout (errors as JSON on stderr)") { @json = true }
        o.on("--home DIR", "state directory (default $MICROSANDBOX_HOME, else ~/.microsandbox)") do |dir|
          ENV["MICROSANDBOX_HOME"] = File.expand_path(dir)
        end
        o.on("-h", "--help") { raise Exit, usage_summary(EXIT_CODES[:ok]) }
        o.on("-v", "--version") { raise Exit, cmd_version([]) }
      end
    end

    # A parser for one command: `--json` and `-h` everywhere, plus the command's own.
    def parser(banner)
      OptionParser.new do |o|
        o.banner = "usage: microsandbox #{banner}"
        o.separator ""
        yield o if block_given?
        o.on("--json", "machine-readable output") { @json = true }
        o.on("-h", "--help", "this help") do
          @out.puts o.help
          raise Exit, EXIT_CODES[:ok]
        end
      end
    end

    def usage_summary(status)
      io = status.zero? ? @out : @err
      io.puts global_parser.banner, "", "Commands:"
      COMMANDS.each { |name, (summary, _)| io.puts format("  %-9s %s", name, summary) }
      io.puts "", "Exit status: the command's own for run/exec/shell; else " \
                  "#{EXIT_CODES.map { |k, v| "#{v} #{k}" }.join(', ')}.",
              "Errors go to stderr as `microsandbox: <code>: <message>`."
      status
    end

    def cmd_help(argv)
      name = argv.shift
      return usage_summary(EXIT_CODES[:ok]) if name.nil?
      raise UsageError, "unknown command #{name.inspect}" unless COMMANDS.key?(name)

      run([name, "--help"])
    end

    def cmd_version(_argv)
      if @json
        emit_json(version: Microsandbox::VERSION, runtime_version: Microsandbox::RUNTIME_VERSION)
      else
        @out.puts "microsandbox #{Microsandbox::VERSION} (runtime #{Microsandbox::RUNTIME_VERSION})"
      end
      EXIT_CODES[:ok]
    end

    # Prints an error on stderr (JSON with --json) and returns the exit status for it.
    def fail_with(code, message, kind)
      status = EXIT_CODES.fetch(kind)
      if @json
        @err.puts JSON.generate(error: { code: code, message: message, exit_status: status })
      else
        @err.puts "microsandbox: #{code}: #{message}"
      end
      status
    end

    def expect_args!(argv, min, max, what)
      raise UsageError, "#{what}: missing argument" if argv.size < min
      raise UsageError, "#{what}: unexpected argument #{argv[max].inspect}" if max && argv.size > max
    end
  end
end
