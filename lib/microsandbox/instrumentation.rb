# frozen_string_literal: true

module Microsandbox
  # Optional instrumentation. When ActiveSupport::Notifications is loaded, the events in
  # {EVENTS} are published through it (subscribe to `/\.microsandbox\z/`); set
  # {Microsandbox.instrumenter} to any object with `instrument(name, payload) { }` to use
  # your own. The block runs the operation, so a subscriber gets its duration, and
  # ActiveSupport adds `:exception`/`:exception_object` when it raises.
  #
  # Payloads are redacted by construction: they carry names, the image reference, the
  # program name, sizes and results — never environment values, arguments (a command
  # line may hold a token: only `args_count` is given), stdin, file contents, registry
  # credentials, secrets, patches or scripts.
  # @api private
  module Instrumentation
    # Event name => payload keys (those marked "after" are added when the operation returns).
    EVENTS = {
      "create.microsandbox" => %i[name image cpus memory_mib network detached] + %i[accel boot_ms], # after: accel, boot_ms
      "start.microsandbox" => %i[name detached],
      "exec.microsandbox" => %i[sandbox cmd args_count tty timeout] + %i[exit_code], # after: exit_code
      "exec_stream.microsandbox" => %i[sandbox cmd args_count tty timeout],
      "stop.microsandbox" => %i[name timeout],
      "kill.microsandbox" => %i[name],
      "remove.microsandbox" => %i[name],
      "pull.microsandbox" => %i[reference pull_policy] + %i[manifest_digest] # after: manifest_digest
    }.freeze

    module_function

    def instrument(event, payload, &block)
      inst = Microsandbox.instrumenter
      inst ? inst.instrument(event, payload, &block) : yield(payload)
    end

    # The create payload from the engine config: only the keys in {EVENTS}; the network
    # policy as its preset name ("custom" for rules, whose hosts are not needed here).
    def create_payload(config, placement)
      network = config["network"]
      policy = network.is_a?(Hash) ? (network["preset"] || "custom") : network
      { name: config["name"], image: config["image"], cpus: config["cpus"], memory_mib: config["memory_mib"],
        network: policy, detached: placement["detached"] }
    end

    def exec_payload(sandbox, program, argv, tty, timeout)
      { sandbox: sandbox, cmd: program, args_count: argv.size, tty: tty ? true : false, timeout: timeout }
    end
  end
end
