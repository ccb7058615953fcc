# frozen_string_literal: true

require "securerandom"
require "microsandbox"

# The "run code" tool of an AI agent: one sandbox per conversation, code cells written to
# its disk and run there, output streamed back as it comes, each cell bounded in time and
# output, the network under a policy. Files persist between cells, like a notebook.
#
#   runner = ToolRunner.new(image: "python:3.12-slim")
#   result = runner.run("print(2 + 2)", language: "python") { |stream, text| print text }
#   result.stdout   # => "4\n"
#   runner.close
class ToolRunner
  # language => [interpreter argv, file extension]
  LANGUAGES = {
    "sh" => [["/bin/sh"], "sh"],
    "python" => [["python3", "-u"], "py"],
    "ruby" => [["ruby"], "rb"],
    "node" => [["node"], "js"]
  }.freeze

  # What one cell produced. `stdout`/`stderr` are valid UTF-8 (at most `max_output` bytes
  # together); `exit_code` is nil when the cell timed out.
  Result = Struct.new(:exit_code, :stdout, :stderr, :timed_out, :truncated, keyword_init: true) do
    # The observation an agent gets back: what it would see in a terminal, plus why it stopped.
    def to_observation
      [stdout, stderr, notes].reject(&:empty?).join("\n")
    end

    # @return [String] e.g. "[output truncated] [exit code 137]"
    def notes
      [("[timed out]" if timed_out), ("[output truncated]" if truncated), ("[exit code #{exit_code}]" if exit_code)]
        .compact.join(" ")
    end
  end

  attr_reader :sandbox

  # @param image [String] image or root directory with the interpreters the agent may use
  # @param network [String, Microsandbox::NetworkPolicy] default "none": no NIC at all.
  #   Give e.g. `Microsandbox::NetworkPolicy.custom(default_egress: :deny, rules:
  #   [Microsandbox::Rule.allow_dns, Microsandbox::Rule.allow(destination: "pypi.org")])`
  # @param timeout [Numeric] default seconds per cell
  # @param max_output [Integer] bytes of stdout+stderr kept per cell; past it the cell is killed
  def initialize(image:, network: "none", timeout: 10, max_output: 64 * 1024, memory: 512, name: nil)
    @timeout = timeout
    @max_output = max_output
    @cells = 0
    @sandbox = Microsandbox::Sandbox.create(name || "agent-#{SecureRandom.hex(4)}", image: image, network: network,
                                                                                  memory: memory, workdir: "/work",
                                                                                  idle_timeout: 900, max_duration: 4 * 3600)
    @sandbox.fs.mkdir("/work") # the workdir appears with the first command; cells are written before it
  end

  # Runs one cell. Yields `(:stdout | :stderr, text)` as output arrives (for streaming to
  # the user), and returns the {Result} (for the model).
  # @raise [ArgumentError] for a language not in {LANGUAGES}
  def run(code, language: "sh", timeout: @timeout)
    argv, ext = LANGUAGES.fetch(language) { raise ArgumentError, "unknown language #{language.inspect}" }
    @cells += 1
    path = "/work/cell-#{@cells}.#{ext}"
    @sandbox.fs.write(path, code)
    out = +"".b
    err = +"".b
    truncated = false
    handle = @sandbox.exec_stream(argv[0], argv[1..] + [path], stdin: :null, timeout: timeout)
    begin
      handle.each do |event|
        raise Microsandbox::ExecFailedError, event.data if event.failed? # no such interpreter
        next unless event.stdout? || event.stderr?

        room = @max_output - out.bytesize - err.bytesize
        bytes = event.bytes.byteslice(0, [room, 0].max)
        (event.stdout? ? out : err) << bytes
        yield(event.kind, Microsandbox::Text.lossy_utf8(bytes)) if block_given? && !bytes.empty?
        next if bytes.bytesize == event.bytes.bytesize || truncated

        truncated = true
        begin
          handle.kill # a program printing forever must not fill the host's memory
        rescue Microsandbox::ExecFailedError
          nil # it finished on its own meanwhile; the events left drain below
        end
      end
      exit_code = handle.exit_code
    rescue Microsandbox::ExecTimeoutError
      timed_out = true
    end
    Result.new(exit_code: timed_out ? nil : exit_code, stdout: Microsandbox::Text.lossy_utf8(out),
               stderr: Microsandbox::Text.lossy_utf8(err), timed_out: timed_out ? true : false, truncated: truncated)
  end

  # Kills the sandbox and removes its disk.
  def close
    name = @sandbox.name
    @sandbox.kill
    Microsandbox::Sandbox.remove(name)
  rescue Microsandbox::SandboxNotFoundError
    nil
  end
end
