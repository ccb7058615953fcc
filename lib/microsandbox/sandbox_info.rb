# frozen_string_literal: true

module Microsandbox
  # A stored sandbox as listed by {Sandbox.list}: a value object (use {Sandbox.get} for a
  # handle that can run commands).
  class SandboxInfo
    # @return [String]
    attr_reader :name
    # @return [Symbol] :running, :starting or :stopped
    attr_reader :status
    # @return [Hash{String=>String}]
    attr_reader :labels
    # @return [Time]
    attr_reader :created_at
    # @return [Time]
    attr_reader :updated_at
    # @return [Hash{String=>Object}] the create options (image, cpus, memory_mib, …)
    attr_reader :config

    # @api private
    def initialize(record)
      @name = record.fetch("name")
      @status = record.fetch("status").to_sym
      @labels = record.fetch("labels", {}).freeze
      @detached = record.fetch("detached", false)
      @created_at = Time.at(record.fetch("created_at"))
      @updated_at = Time.at(record.fetch("updated_at"))
      config = JSON.parse(record.fetch("config"))
      config.delete("env") # may hold secrets
      @config = config.freeze
    end

    # @return [Boolean]
    def running? = status == :running
    # @return [Boolean]
    def detached? = @detached

    # @return [Sandbox] a handle on this sandbox
    def sandbox
      Sandbox.get(name)
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{name.inspect} #{status}#{' detached' if detached?}>"
    end
  end
end
