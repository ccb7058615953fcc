# frozen_string_literal: true

module Microsandbox
  # Optional instrumentation. When ActiveSupport::Notifications is loaded, events such
  # as `create.microsandbox` and `exec.microsandbox` are published through it; set
  # {Microsandbox.instrumenter} to any object with `instrument(name, payload) { }` to
  # use your own. Payloads carry names and commands, never environment values or stdin.
  # @api private
  module Instrumentation
    module_function

    def instrument(event, payload, &block)
      inst = Microsandbox.instrumenter
      inst ? inst.instrument(event, payload, &block) : yield
    end
  end
end
