# frozen_string_literal: true

require "rbs"
require "microsandbox/cli" # loaded by exe/microsandbox, declared in the same RBS

# sig/microsandbox.rbs against the loaded gem, both ways: every module and class under
# Microsandbox, every public method (instance and singleton) and every declared constant
# must be declared there, and everything declared must exist. Parsed with the rbs gem that
# ships with Ruby (Debian's libruby), so a syntax error in the signature fails here too.
#
# Not compared: Microsandbox::Native (the extension's classes, only reached through the
# Ruby wrappers), methods a class inherits from core (Object, Struct, StandardError…,
# whose signatures core RBS provides: an `inspect` or `==` override needs no declaration),
# and what Struct.new generates besides the readers (member setters; the class methods
# `new`, `[]`, `members`, `keyword_init?`).
RSpec.describe "sig/microsandbox.rbs" do
  sig_path = File.expand_path("../../sig/microsandbox.rbs", __dir__)

  # name => { inst: {name => kind}, sing: [names], consts: [names], module: bool }
  def self.declarations(path)
    out = {}
    walk = lambda do |decl, prefix|
      name = (prefix + [decl.name.to_s]).join("::")
      entry = (out[name] ||= { inst: {}, sing: [], consts: [], module: decl.is_a?(RBS::AST::Declarations::Module) })
      decl.members.each do |m|
        case m
        when RBS::AST::Members::MethodDefinition
          entry[:inst][m.name] = m.kind if %i[instance singleton_instance].include?(m.kind)
          entry[:sing] << m.name if %i[singleton singleton_instance].include?(m.kind)
        when RBS::AST::Members::AttrReader, RBS::AST::Members::AttrAccessor, RBS::AST::Members::AttrWriter
          names = []
          names << m.name unless m.is_a?(RBS::AST::Members::AttrWriter)
          names << :"#{m.name}=" unless m.is_a?(RBS::AST::Members::AttrReader)
          m.kind == :singleton ? entry[:sing].concat(names) : names.each { |n| entry[:inst][n] = :instance }
        when RBS::AST::Members::Alias
          m.kind == :singleton ? entry[:sing] << m.new_name : entry[:inst][m.new_name] = :instance
        when RBS::AST::Declarations::Constant
          entry[:consts] << m.name.to_s
        when RBS::AST::Declarations::Module, RBS::AST::Declarations::Class
          walk.call(m, prefix + [decl.name.to_s])
        end
      end
    end
    RBS::Parser.parse_signature(File.read(path)).each do |d|
      walk.call(d, []) if d.is_a?(RBS::AST::Declarations::Module) || d.is_a?(RBS::AST::Declarations::Class)
    end
    out
  end

  def self.runtime_modules
    found = {}
    visit = lambda do |mod|
      next if found.key?(mod.name) || mod.name == "Microsandbox::Native"

      found[mod.name] = mod
      mod.constants(false).each do |c|
        v = mod.const_get(c, false)
        visit.call(v) if v.is_a?(Module) && v.name == "#{mod.name}::#{c}"
      end
    end
    visit.call(Microsandbox)
    found
  end

  declared = declarations(sig_path)
  runtime = runtime_modules
  struct_generated = %i[new [] members keyword_init? inspect]

  it "declares every module and class of the gem, and nothing that does not exist" do
    undeclared = runtime.keys - declared.keys
    expect(undeclared).to be_empty, "modules/classes missing from the RBS: #{undeclared.join(', ')}"
    stale = declared.keys - runtime.keys
    expect(stale).to be_empty, "RBS declares modules/classes the gem does not define: #{stale.join(', ')}"
    declared.each do |name, d|
      expect(runtime[name].is_a?(Class)).to eq(!d[:module]), "#{name}: module/class kind differs from the RBS"
    end
  end

  it "declares every public instance method, and each declared one exists" do
    problems = []
    declared.each do |name, d|
      mod = runtime[name] or next
      core = mod.is_a?(Class) ? (mod.superclass&.public_instance_methods || []) : Object.public_instance_methods
      own = mod.public_instance_methods(false) - core
      own -= mod.members.map { |m| :"#{m}=" } if mod.is_a?(Class) && mod < Struct
      own.each do |m|
        problems << "#{name}##{m} is not declared" unless d[:inst].key?(m)
      end
      d[:inst].each do |m, kind|
        ok = if m == :initialize || kind == :singleton_instance
               mod.method_defined?(m) || mod.private_method_defined?(m)
             else
               mod.public_method_defined?(m)
             end
        problems << "#{name}##{m} is declared but not a public method" unless ok
      end
    end
    expect(problems).to eq([])
  end

  it "declares every public singleton method, and each declared one exists" do
    problems = []
    declared.each do |name, d|
      mod = runtime[name] or next
      own = mod.singleton_methods(false)
      own -= struct_generated if mod.is_a?(Class) && mod < Struct
      (own - (mod.is_a?(Class) ? Class.public_instance_methods : Module.public_instance_methods)).each do |m|
        problems << "#{name}.#{m} is not declared" unless d[:sing].include?(m)
      end
      d[:sing].each { |m| problems << "#{name}.#{m} is declared but does not exist" unless mod.respond_to?(m) }
    end
    expect(problems).to eq([])
  end

  it "declares only constants that exist" do
    missing = declared.flat_map do |name, d|
      d[:consts].reject { |c| runtime[name]&.const_defined?(c, false) }.map { |c| "#{name}::#{c}" }
    end
    expect(missing).to eq([])
  end
end
